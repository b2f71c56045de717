"""File primitives shared by ``data_prep`` and ``pretrain`` (``pretrain`` depends on ``data_prep``, never the reverse).

- :func:`atomic_path`: a temporary name beside the target, fsync, rename over it, fsync of the folder. A reader sees
  the old file or the new one, never half of one; a failure (a full disk, a kill) leaves the old file and no
  temporary file behind.
- :func:`atomic_write_bytes` / :func:`atomic_write_text`: the same for bytes / text.
- :func:`sha256_file`: a file's hex sha256, read in 4 MiB blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


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


def leftover_temps(folder: str | os.PathLike, names) -> list[Path]:
    """Temporary files that :func:`atomic_path` left in ``folder`` for targets whose names start with one of
    ``names`` (a process killed mid-write): what a resuming writer removes."""
    return [p for p in Path(folder).glob(f".*{TEMP_MARK}*") if p.name[1:].startswith(tuple(names))]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; when the block ends without error, rename it over ``path``.

    The caller writes the whole file to the yielded path (any writer: ``open``, ``torch.save``, ``np.save``). The file
    is fsynced before the rename and the folder after it; ``mode`` sets its permission bits. On any exception the
    temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished, fsynced file ``tmp`` over ``path`` and fsync the folder (the last step of
    :func:`atomic_path`, for writers that keep their own temporary file, such as a shard being appended to)."""
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``out`` with renames only, replacing an older ``out`` (moved aside first,
    then deleted): a reader sees the old folder or the new one. Returns ``out``."""
    import shutil

    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder beside ``out`` (``.NAME.tmp-XXXXXXXX``); when the block ends without error, move it
    over ``out`` (:func:`replace_dir`: a reader sees the old folder or the new one). On any error the temporary
    folder is removed and ``out`` is left as it was."""
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{TEMP_MARK}"))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`); returns ``path``."""
    with atomic_path(path, mode) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`); returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of the file at ``path``, read in ``chunk``-byte blocks (4 MiB). Raises ``OSError`` if unreadable."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
