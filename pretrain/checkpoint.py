"""Checkpoints: DeepSpeed state + per-rank RNG + a completion manifest; ``latest`` moves only after every rank wrote.

Layout of ``output_dir/checkpoints/``::

    step_00001000/                     one tag per saved step
        mp_rank_00_model_states.pt     DeepSpeed (module, client_state: step, data cursor, tokens seen, config)
        *_optim_states.pt              DeepSpeed (ZeRO partitions, one per rank)
        rng_rank_00000.pt ...          this rank's python / numpy / torch (/ cuda) RNG states
        hf/                            student config + tokenizer (+ sentence-transformers files): export needs nothing else
        checkpoint.json                written last, by rank 0 after a barrier: step, world size, every file's size and sha256
    latest                             the newest complete tag, replaced atomically after checkpoint.json
    zero_to_fp32.py                    DeepSpeed's recovery script

A tag without a valid ``checkpoint.json`` (a save cut off by preemption, a truncated or altered file) is skipped at
resume for the previous complete one, with a warning naming it (:meth:`CheckpointManager.find_resume`).
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.files import atomic_path, atomic_write_text, sha256_file
from pretrain.rundir import RunDir
from pretrain.runtime import RunError
from pretrain.schema import ConfigError

TAG_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "checkpoint.json"


def tag_for(step: int) -> str:
    """The tag (directory name) of the checkpoint at ``step``: ``step_00001000``."""
    return f"step_{step:08d}"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`data_prep.files.atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch CPU and (when present) the current CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_tags(root: Path) -> list[tuple[int, str]]:
    """``[(step, tag), ...]`` of the tag directories under ``root``, newest first."""
    if not Path(root).is_dir():
        return []
    out = [(int(m.group(1)), p.name) for p in Path(root).iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))]
    return sorted(out, reverse=True)


def verify(tag_dir: Path) -> dict[str, Any]:
    """Check a tag directory against its ``checkpoint.json``; returns the manifest.

    Raises ``ValueError`` saying what is wrong: no manifest (the save did not finish), a malformed manifest, a listed
    file missing, of another size or with another sha256.
    """
    tag_dir = Path(tag_dir)
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(f"no {MANIFEST}: the save did not finish") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable {MANIFEST}: {e}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    well_formed = (
        isinstance(files, dict)
        and isinstance(manifest.get("step"), int)
        and isinstance(manifest.get("world_size"), int)
        and all(
            isinstance(i, dict) and isinstance(i.get("bytes"), int) and isinstance(i.get("sha256"), str)
            for i in files.values()
        )
    )
    if not well_formed:
        raise ValueError(f"malformed {MANIFEST} (expected step, world_size and files with bytes and sha256)")
    for name, info in files.items():
        path = tag_dir / name
        if not path.is_file():
            raise ValueError(f"{name} is missing")
        if path.stat().st_size != info["bytes"]:
            raise ValueError(f"{name} has {path.stat().st_size} bytes, the manifest says {info['bytes']}")
        if sha256_file(path) != info["sha256"]:
            raise ValueError(f"{name} does not match its sha256 (corrupted)")
    return manifest


class CheckpointError(RunError):
    """A checkpoint could not be written (a full disk, an I/O error); the last complete checkpoint is intact."""


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _is_disk_full(e: BaseException) -> bool:
    """Whether an exception from a writer (``OSError``, torch's or safetensors' ``RuntimeError``) says the disk is
    full or the write failed at the I/O level."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("no space", "quota", "iostream error", "failed writing", "unexpected pos", "i/o error")
    )


class CheckpointManager:
    """Saves, finds and exports the checkpoints of one run (see the module docstring); the run directory's layout
    comes from :class:`pretrain.rundir.RunDir`.

    Args:
        run: the run directory.
        rank, world_size: this process in the data-parallel world.
        keep_last: complete checkpoints kept; older tags are deleted after a save.
        save_interval: steps between checkpoints (0: only at the end and on a stop signal).
        all_ok: a collective ``(ok: bool) -> bool`` that is True when ``ok`` on every rank (an all-reduce MIN; it
            doubles as the barrier between the phases of a save).
    """

    def __init__(
        self,
        run: RunDir,
        *,
        rank: int,
        world_size: int,
        keep_last: int,
        save_interval: int,
        all_ok: Callable[[bool], bool],
    ):
        self.run, self.root = run, run.checkpoints
        self.rank, self.world_size, self.keep_last, self.save_interval = rank, world_size, keep_last, save_interval
        self.all_ok = all_ok
        self.last_saved: int | None = None

    def should_save(self, step: int, *, last: bool, stopping: bool) -> bool:
        """Whether to checkpoint after ``step``: at the interval, at the last step, and when the ranks stop."""
        return stopping or last or bool(self.save_interval and step % self.save_interval == 0)

    def save(
        self, engine, step: int, client_state: dict[str, Any], write_extra: Callable[[Path], None] | None = None
    ) -> Path:
        """Save a checkpoint on every rank (collective: all ranks must call it at the same step).

        ``client_state`` goes into DeepSpeed's model-states file; each rank adds its RNG states; rank 0 runs
        ``write_extra(tag_dir)`` (the ``hf/`` folder), then, once every rank is done, writes ``checkpoint.json``
        and moves ``latest``, then deletes checkpoints beyond ``keep_last``. Returns the tag directory.

        Raises :class:`CheckpointError` on every rank when a rank could not write (one line: the folder, the space
        needed and free, and that the last complete checkpoint is intact); ``latest`` then still names that one.
        """
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.rank == 0 and tag_dir.exists():  # a cut-off save of the same step, or a re-save: start clean
            shutil.rmtree(tag_dir)
        self.all_ok(True)
        error = None
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
            atomic_torch_save(rng_state(), tag_dir / f"rng_rank_{self.rank:05d}.pt")
            if self.rank == 0 and write_extra is not None:
                write_extra(tag_dir)
        except (OSError, RuntimeError) as e:
            if not _is_disk_full(e):
                raise
            error = e
        if not self.all_ok(error is None):
            raise self._save_failed(tag_dir, error)
        if self.rank == 0:
            files = {}
            for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
                files[str(path.relative_to(tag_dir))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            manifest = {
                "step": step,
                "tag": tag,
                "world_size": self.world_size,
                "files": files,
                "config": client_state.get("config"),
            }
            atomic_write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
            atomic_write_text(self.run.latest_file, tag)
            self._prune(keep=tag)
        self.all_ok(True)
        self.last_saved = step
        return tag_dir

    def _save_failed(self, tag_dir: Path, error: BaseException | None) -> CheckpointError:
        """The error of a failed save; rank 0 removes the partial tag (its space is needed, and it is not
        resumable)."""
        complete = [t for _, t in list_tags(self.root) if (self.root / t / MANIFEST).is_file() and t != tag_dir.name]
        size = _folder_bytes(self.root / complete[0]) if complete else _folder_bytes(tag_dir)
        if self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        free = shutil.disk_usage(self.root).free
        intact = (
            f"the last complete checkpoint {self.root / complete[0]} is intact and a rerun resumes from it"
            if complete
            else "there is no complete checkpoint yet"
        )
        what = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if error else "failed on another rank"
        return CheckpointError(
            f"could not write checkpoint {tag_dir} ({what}); a checkpoint needs about "
            f"{size / 2**20:,.1f} MiB and {free / 2**20:,.1f} MiB are free on that file system; "
            f"{intact}. Free space and run the same command again"
        )

    def _prune(self, keep: str) -> None:
        complete = [t for s, t in list_tags(self.root) if (self.root / t / MANIFEST).is_file()]
        keep_set = set(complete[: self.keep_last]) | {keep}
        for _, tag in list_tags(self.root):  # older complete ones and incomplete leftovers
            if tag not in keep_set:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    def find_resume(self) -> tuple[str | None, dict[str, Any] | None, list[str]]:
        """The newest complete checkpoint: ``(tag, manifest, warnings)``; ``(None, None, [])`` when there is none.

        Checks tags newest first with :func:`verify`; each skipped tag gives a warning naming it and why. Call on one
        rank and broadcast the answer (it reads and hashes every file). Raises ``ValueError`` when tags exist but
        none is complete (never starts over silently).
        """
        notes = []
        tags = list_tags(self.root)
        for _step, tag in tags:
            try:
                manifest = verify(self.root / tag)
            except ValueError as e:
                notes.append(f"skipping checkpoint {self.root / tag}: {e}")
                continue
            return tag, manifest, notes
        if tags:
            raise ValueError(
                f"{self.root} holds checkpoints but none is complete ({'; '.join(notes)}); move the "
                f"directory away to start over, or restore a complete checkpoint"
            )
        return None, None, notes

    def resume_point(self, mine: dict, *, allow_world_size_change: bool) -> tuple[str, dict] | None:
        """The newest complete checkpoint ``(tag, manifest)`` a run of resolved config ``mine`` can resume, or None
        for a fresh run (call on one rank). Warnings name skipped checkpoints. Raises :class:`ConfigError` for
        another run's checkpoints (:meth:`pretrain.rundir.RunDir.check_same_run`), another world size unless
        allowed (another world size then loads through :mod:`pretrain.reshard`)."""
        from pretrain.runtime import warn

        try:
            tag, manifest, notes = self.find_resume()
        except ValueError as e:
            raise ConfigError(f"train.output_dir: {e}") from None
        for note in notes:
            warn(note)
        if tag is None:
            return None
        try:
            self.run.check_same_run(manifest, mine, self.world_size, allow_world_size_change)
        except ValueError as e:
            key = "train.allow_world_size_change" if "rank(s)" in str(e) else "train.output_dir"
            raise ConfigError(f"{key}: {e}") from None
        return tag, manifest

    def load_rng(self, tag: str) -> bool:
        """Restore this rank's RNG states from ``tag``; False when the tag has none for this rank."""
        path = self.root / tag / f"rng_rank_{self.rank:05d}.pt"
        if not path.is_file():
            return False
        set_rng_state(torch.load(path, weights_only=False))
        return True

    # -- exports -----------------------------------------------------------------------------------------------

    def export_final(self) -> tuple[Path, bool]:
        """Rank 0 exports the latest checkpoint to ``student/`` unless it holds that export already; returns
        ``(folder, exported now)``. Not collective (the caller adds the barrier)."""
        from pretrain.export import export_checkpoint

        tag = self.run.latest_tag()
        if tag is None:
            raise FileNotFoundError(f"{self.run.latest_file}: no checkpoint to export")
        if self.run.finished():
            return self.run.student, False
        export_checkpoint(self.root, self.run.student, tag)
        return self.run.student, True

    def export_init(self, student: torch.nn.Module, write_meta: Callable[[Path], None], info: dict) -> Path | None:
        """Save ``student`` (before training) to ``student_init/`` once (rank 0); None when it exists already."""
        import tempfile

        from pretrain.export import save_student

        if self.run.student_init.is_dir():
            return None
        with tempfile.TemporaryDirectory(dir=self.run.root) as meta:
            write_meta(Path(meta))
            save_student(student, self.run.student_init, Path(meta), info)
        return self.run.student_init
