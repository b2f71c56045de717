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

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

TAG_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "checkpoint.json"


def tag_for(step: int) -> str:
    """The tag (directory name) of the checkpoint at ``step``: ``step_00001000``."""
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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

    Raises ``ValueError`` saying what is wrong: no manifest (the save did not finish), a listed file missing, of
    another size or with another sha256.
    """
    tag_dir = Path(tag_dir)
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(f"no {MANIFEST}: the save did not finish") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable {MANIFEST}: {e}") from None
    for name, info in manifest.get("files", {}).items():
        path = tag_dir / name
        if not path.is_file():
            raise ValueError(f"{name} is missing")
        if path.stat().st_size != info["bytes"]:
            raise ValueError(f"{name} has {path.stat().st_size} bytes, the manifest says {info['bytes']}")
        if sha256_file(path) != info["sha256"]:
            raise ValueError(f"{name} does not match its sha256 (corrupted)")
    return manifest


class CheckpointManager:
    """Saves and finds checkpoints of one run (see the module docstring).

    Args:
        root: ``output_dir/checkpoints``.
        rank, world_size: this process in the data-parallel world.
        keep_last: complete checkpoints kept; older tags are deleted after a save.
        barrier: a callable that blocks until every rank reached it (``torch.distributed.barrier``).
    """

    def __init__(self, root: str | Path, *, rank: int, world_size: int, keep_last: int,
                 barrier: Callable[[], None]):
        self.root, self.rank, self.world_size, self.keep_last = Path(root), rank, world_size, keep_last
        self.barrier = barrier

    def save(self, engine, step: int, client_state: dict[str, Any],
             write_extra: Callable[[Path], None] | None = None) -> Path:
        """Save a checkpoint on every rank (collective: all ranks must call it at the same step).

        ``client_state`` goes into DeepSpeed's model-states file; each rank adds its RNG states; rank 0 runs
        ``write_extra(tag_dir)`` (the ``hf/`` folder), then, once every rank is done, writes ``checkpoint.json``
        and moves ``latest``, then deletes checkpoints beyond ``keep_last``. Returns the tag directory.
        """
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.rank == 0 and tag_dir.exists():  # a cut-off save of the same step, or a re-save: start clean
            shutil.rmtree(tag_dir)
        self.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        atomic_torch_save(rng_state(), tag_dir / f"rng_rank_{self.rank:05d}.pt")
        if self.rank == 0 and write_extra is not None:
            write_extra(tag_dir)
        self.barrier()
        if self.rank == 0:
            files = {}
            for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
                files[str(path.relative_to(tag_dir))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            manifest = {"step": step, "tag": tag, "world_size": self.world_size, "files": files,
                        "config": client_state.get("config")}
            atomic_write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
            atomic_write_text(self.root / "latest", tag)
            self._prune(keep=tag)
        self.barrier()
        return tag_dir

    def _prune(self, keep: str) -> None:
        complete = [t for s, t in list_tags(self.root) if (self.root / t / MANIFEST).is_file()]
        keep_set = set(complete[:self.keep_last]) | {keep}
        for _, tag in list_tags(self.root):  # older complete ones and incomplete leftovers
            if tag not in keep_set:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    def find_resume(self) -> tuple[str | None, dict[str, Any] | None, list[str]]:
        """The newest complete checkpoint: ``(tag, manifest, warnings)``; ``(None, None, [])`` when there is none.

        Checks tags newest first with :func:`verify`; each skipped tag gives a warning naming it and why. Call on one
        rank and broadcast the answer (it reads and hashes every file). Raises ``RuntimeError`` when tags exist but
        none is complete (never starts over silently).
        """
        notes = []
        tags = list_tags(self.root)
        for step, tag in tags:
            try:
                manifest = verify(self.root / tag)
            except ValueError as e:
                notes.append(f"skipping checkpoint {self.root / tag}: {e}")
                continue
            return tag, manifest, notes
        if tags:
            raise RuntimeError(f"{self.root} holds checkpoints but none is complete ({'; '.join(notes)}); move the "
                               f"directory away to start over, or restore a complete checkpoint")
        return None, None, notes

    def load_rng(self, tag: str) -> bool:
        """Restore this rank's RNG states from ``tag``; False when the tag has none for this rank."""
        path = self.root / tag / f"rng_rank_{self.rank:05d}.pt"
        if not path.is_file():
            return False
        set_rng_state(torch.load(path, weights_only=False))
        return True
