"""File primitives shared by ``data_prep`` and ``pretrain`` (``pretrain`` depends on ``data_prep``, never the reverse).

Every file and folder the project writes goes through here, which owns three rules:

- Atomicity. :func:`atomic_path`: a temporary name beside the target, fsync, rename over it, fsync of the folder. A
  reader sees the old file or the new one, never half of one; a failure (a full disk, a kill) leaves the old file and
  no temporary file behind. :func:`atomic_write_bytes` / :func:`atomic_write_text` do the same for bytes / text;
  :func:`atomic_dir` for a whole folder (a temporary sibling folder renamed over the target).
- Permissions. Temporary files and folders are created with ``0o666`` / ``0o777`` less the process umask (the kernel
  applies it), so what is written gets the mode a plain ``open()`` / ``mkdir`` gives: 0644 / 0755 under umask 022,
  0600 / 0700 under 077 (``tempfile.mkstemp`` / ``mkdtemp`` would make everything 0600 / 0700). A folder written
  with :func:`atomic_dir` is normalised to those modes before it is renamed into place, since some writers create
  their files 0600 whatever the umask (safetensors 0.8 writes through a temporary file of its own).
- A full disk. A write that fails with ``ENOSPC`` / ``EDQUOT`` / ``EFBIG`` / ``EIO`` (or torch's or safetensors'
  error saying so) raises :class:`DiskFullError` with one line: what was being written, where, the space it needs
  (when the caller can say), the space free and what is intact (:func:`disk_full_message`).

And one rule for folders: no folder writer replaces what it did not write (:func:`check_replaceable`). Each folder
written by :func:`atomic_dir` holds a marker file, :data:`OUTPUT_MARKER` (``{"writer": KIND}``); a non-empty target
without the marker of the same kind is refused unless the caller passes ``overwrite``; a run directory, the home
folder, a file system root, and a folder that contains the command's own input are refused always.

:func:`sha256_file`: a file's hex sha256, read in 4 MiB blocks.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_prep.errors import DiskFullError, OutputExistsError

MIB = 2**20
__all__ = ["DiskFullError", "OutputExistsError"]  # defined in data_prep.errors, raised here


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
# torch.save ("PytorchStreamWriter failed writing file", "unexpected pos"), safetensors (Rust io::Error text), C++
# streams: the writers that report a full disk as a RuntimeError or SafetensorError with the OS message inside
_FULL_TEXTS = (
    "no space left",
    "storagefull",
    "quota",
    "file too large",
    "iostream error",
    "failed writing",
    "unexpected pos",
    "input/output error",
    "i/o error",
)


def is_disk_full(e: BaseException) -> bool:
    """Whether an exception from a writer says the disk is full or the write failed at the I/O level: an ``OSError``
    with errno ``ENOSPC`` / ``EDQUOT`` / ``EFBIG`` / ``EIO``, or another writer's error (torch's ``RuntimeError``,
    safetensors' ``SafetensorError``) whose message says so."""
    if isinstance(e, OSError):
        return e.errno in _FULL_ERRNOS
    if not isinstance(e, RuntimeError) and type(e).__name__ != "SafetensorError":
        return False
    text = str(e).lower()
    return any(s in text for s in _FULL_TEXTS)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (``shutil.disk_usage``) on the file system of ``path`` or of its nearest existing parent; None when
    that cannot be read."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full_message(
    what: str,
    where: str | os.PathLike,
    error: BaseException | None,
    *,
    needed: int | None = None,
    intact: str,
    todo: str = "Free space and run the same command again",
) -> str:
    """The one-line message of a write that failed for lack of space, used by every writer (checkpoints included):
    ``could not write WHAT WHERE (ERROR); it needs about N MiB and M MiB are free on that file system; INTACT. TODO``.

    ``needed`` (bytes, when the caller can say) and the free space (:func:`free_bytes`) are given in MiB; ``error``
    None means the write failed elsewhere (another rank)."""
    cause = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if error else "failed on another rank"
    free = free_bytes(where)
    free_text = f"{free / MIB:,.1f} MiB are free on that file system" if free is not None else "free space unknown"
    need = f"it needs about {needed / MIB:,.1f} MiB and " if needed else ""
    return f"could not write {what} {where} ({cause}); {need}{free_text}; {intact}" + (f". {todo}" if todo else "")


@contextlib.contextmanager
def disk_full_as_error(
    what: str, where: str | os.PathLike, *, intact: str, needed: int | None = None, cleanup=None
) -> Iterator[None]:
    """Turn a full-disk error (:func:`is_disk_full`) raised in the block into :class:`DiskFullError`
    (:func:`disk_full_message` with these arguments); other errors pass unchanged. ``cleanup()`` runs first when given
    (remove the partial output, so the free space reported is what a retry has)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        if cleanup is not None:
            cleanup()
        raise DiskFullError(disk_full_message(what, where, e, needed=needed, intact=intact)) from e


def _fsync_dir(folder: Path) -> None:
    try:  # make the rename durable too (not possible on every file system)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


TEMP_MARK = ".tmp-"  # a temporary file of ``NAME`` is ``.NAME.tmp-XXXXXXXX`` in the same folder


def leftover_temps(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Temporary files that :func:`atomic_path` left in ``folder`` for targets whose names start with one of
    ``names`` (a process killed mid-write): what a resuming writer removes."""
    return [p for p in Path(folder).glob(f".*{TEMP_MARK}*") if p.name[1:].startswith(tuple(names))]


def current_umask() -> int:
    """The process umask, read without changing it where possible (``Umask:`` of ``/proc/self/status``, Linux 4.7+);
    else set to 0o077 and restored at once (a file another thread creates in between gets the stricter mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def normalise_modes(folder: str | os.PathLike) -> None:
    """Give ``folder``, its subfolders and files the modes a plain ``mkdir`` / ``open()`` gives under the umask
    (``0o777`` / ``0o666`` less it; a file with an execute bit keeps ``0o777`` less it). Symbolic links are left
    alone."""
    umask = current_umask()
    folder = Path(folder)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, 0o777 & ~umask)
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                full = 0o777 if os.stat(p).st_mode & 0o111 else 0o666
                os.chmod(p, full & ~umask)


def _temp_sibling(path: Path, make_dir: bool) -> Path:
    """Create ``.NAME.tmp-XXXXXXXX`` beside ``path``: an empty file (``0o666`` less the umask) or a folder (``0o777``
    less the umask), the modes a plain ``open()`` / ``mkdir`` gives."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}{TEMP_MARK}{secrets.token_hex(4)}")
        try:
            if make_dir:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def _unchanged(path: Path) -> str:
    return f"{path} is unchanged" if path.exists() else f"nothing was written at {path}"


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, mode: int | None = None, *, what: str = "file", needed: int | None = None
) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; when the block ends without error, rename it over ``path``.

    The caller writes the whole file to the yielded path (any writer: ``open``, ``torch.save``, ``np.save``). The file
    is fsynced before the rename and the folder after it. Its permission bits are ``mode`` when given, else those of a
    plain ``open()`` under the process umask. On any exception the temporary file is removed and ``path`` is left as
    it was; a full disk raises :class:`DiskFullError` naming ``what`` (e.g. ``"manifest"``), ``path`` and ``needed``
    bytes (when given).
    """
    path = Path(path)
    intact = _unchanged(path)
    tmp: Path | None = None

    def remove() -> None:
        if tmp is not None:
            tmp.unlink(missing_ok=True)

    with disk_full_as_error(what, path, intact=intact, needed=needed, cleanup=remove):
        tmp = _temp_sibling(path, make_dir=False)
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if mode is None:  # the writer may have replaced the file with one of its own (0600)
                mode = (0o777 if os.stat(tmp).st_mode & 0o111 else 0o666) & ~current_umask()
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            remove()
            raise
    _fsync_dir(path.parent)


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished, fsynced file ``tmp`` over ``path`` and fsync the folder (the last step of
    :func:`atomic_path`, for writers that keep their own temporary file, such as a shard being appended to)."""
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


# -- folders: the output guard -------------------------------------------------------------------------------------

OUTPUT_MARKER = ".bert-distill-output.json"  # {"writer": KIND} in every folder atomic_dir writes (a dotfile: the
# Hugging Face and sentence-transformers loaders ignore it)
# folders written before the marker existed: a file that only that writer puts there stands for the marker
LEGACY_SIGNS = {"distill_export.json": "export", "downstream_finetune.json": "output", "truncation.json": "output"}


def output_kind(folder: str | os.PathLike) -> str | None:
    """The writer kind recorded in ``folder``'s :data:`OUTPUT_MARKER` (or implied by a :data:`LEGACY_SIGNS` file);
    None when the folder holds neither (not this project's output)."""
    folder = Path(folder)
    try:
        kind = json.loads((folder / OUTPUT_MARKER).read_text()).get("writer")
        if isinstance(kind, str):
            return kind
    except (OSError, ValueError, AttributeError):
        pass
    return next((k for name, k in LEGACY_SIGNS.items() if (folder / name).is_file()), None)


def holds_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a training run directory (``pretrain.rundir``'s layout: ``config.json`` with
    ``checkpoints/`` or ``metrics.jsonl``)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and (
        (folder / "checkpoints").is_dir() or (folder / "metrics.jsonl").is_file()
    )


def check_replaceable(
    out: str | os.PathLike, *, kind: str, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> None:
    """Refuse to replace ``out`` with a folder of writer ``kind`` when that would delete what this writer did not write.

    Allowed: ``out`` missing or empty, or holding this writer's earlier output (:func:`output_kind` == ``kind``); any
    other non-empty folder only with ``overwrite``. Refused always (even with ``overwrite``): a file, a run directory
    (:func:`holds_run`), the home folder or a file system root, and a folder that is or contains one of ``inputs``
    (what the command reads, e.g. the checkpoint being exported) or lies inside one.

    Raises:
        OutputExistsError: naming ``out`` and what to do.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder; give a new or empty folder")
    real = out.resolve()
    never = "; give a new or empty folder (this is refused even with --overwrite)"
    for src in inputs:
        s = Path(src).resolve()
        if s == real or real in s.parents:
            raise OutputExistsError(f"{out}: contains this command's input {src}{never}")
        if s in real.parents:
            raise OutputExistsError(f"{out}: lies inside this command's input {src}{never}")
    if holds_run(out):
        raise OutputExistsError(f"{out}: holds a training run (config.json with checkpoints/ or metrics.jsonl){never}")
    if real == Path.home().resolve() or real == Path(real.anchor):
        raise OutputExistsError(f"{out}: the home folder or a file system root{never}")
    if overwrite or not any(out.iterdir()) or output_kind(out) == kind:
        return
    raise OutputExistsError(
        f"{out}: a non-empty folder this command did not write (no {OUTPUT_MARKER} of a {kind}); give a new or "
        f"empty folder, or pass --overwrite to replace it and everything in it"
    )


def replace_dir(
    tmp: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Move the finished folder ``tmp`` to ``out`` with renames only, replacing an older ``out`` (moved aside first,
    then deleted): a reader sees the old folder or the new one. Returns ``out``.

    ``out`` must pass :func:`check_replaceable` for the writer kind recorded in ``tmp`` (:data:`OUTPUT_MARKER`;
    ``"output"`` when it has none), else :class:`OutputExistsError` and nothing moves.
    """
    tmp, out = Path(tmp), Path(out)
    check_replaceable(out, kind=output_kind(tmp) or "output", overwrite=overwrite, inputs=inputs)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)
    return out


@contextlib.contextmanager
def atomic_dir(
    out: str | os.PathLike,
    *,
    kind: str = "output",
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    what: str | None = None,
    needed: int | None = None,
) -> Iterator[Path]:
    """Yield a new temporary folder beside ``out`` (``.NAME.tmp-XXXXXXXX``); when the block ends without error, write
    :data:`OUTPUT_MARKER` (``{"writer": kind}``) into it and move it over ``out`` (:func:`replace_dir`: a reader sees
    the old folder or the new one).

    ``out`` is checked first (:func:`check_replaceable` with ``kind``, ``overwrite``, ``inputs``), before any work:
    :class:`OutputExistsError`. On any error the temporary folder is removed and ``out`` is left as it was; a full disk
    raises :class:`DiskFullError` naming ``what`` (default ``kind``), ``out`` and ``needed`` bytes (when given).
    Folder and files get the modes a plain ``mkdir`` / ``open()`` gives under the umask.
    """
    out = Path(out)
    inputs = list(inputs)
    check_replaceable(out, kind=kind, overwrite=overwrite, inputs=inputs)
    intact = f"{_unchanged(out)} and the temporary folder was removed"
    tmp: Path | None = None

    def remove() -> None:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    with disk_full_as_error(what or kind, out, intact=intact, needed=needed, cleanup=remove):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_sibling(out, make_dir=True)
        try:
            yield tmp
            (tmp / OUTPUT_MARKER).write_text(json.dumps({"writer": kind}) + "\n")
            normalise_modes(tmp)
            replace_dir(tmp, out, overwrite=overwrite, inputs=inputs)
        except BaseException:
            remove()
            raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None, *, what: str = "file") -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`; a full disk: :class:`DiskFullError` naming
    ``what`` and ``len(data)``); returns ``path``."""
    with atomic_path(path, mode, what=what, needed=len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None, *, what: str = "file") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`); returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode, what=what)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of the file at ``path``, read in ``chunk``-byte blocks (4 MiB). Raises ``OSError`` if unreadable."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
