"""Checkpoints: DeepSpeed state + per-rank RNG + a completion manifest; ``latest`` moves only after every rank wrote.

Layout of ``output_dir/checkpoints/``::

    step_00001000/                     one tag per saved step
        mp_rank_00_model_states.pt     DeepSpeed (module, client_state: step, data cursor, tokens seen, config)
        *_optim_states.pt              DeepSpeed (ZeRO partitions, one per rank)
        rng_rank_00000.pt ...          this rank's python / numpy / torch (/ cuda) RNG states
        hf/                            student config + tokenizer (+ sentence-transformers files): all export needs
        checkpoint.json                written last, by rank 0 after a barrier: step, world size, files' size, sha256
    latest                             the newest complete tag, replaced atomically after checkpoint.json
    zero_to_fp32.py                    DeepSpeed's recovery script

A tag without a valid ``checkpoint.json`` (a save cut off by preemption, a truncated or altered file) is skipped at
resume for the previous complete one, with a warning naming it (:meth:`CheckpointManager.find_resume`).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.errors import DataPrepError
from data_prep.files import (
    MIB,
    DiskFullError,
    atomic_path,
    atomic_write_text,
    disk_full_message,
    free_bytes,
    is_disk_full,
    sha256_file,
)
from pretrain.rundir import RunDir
from pretrain.runtime import RunError
from pretrain.schema import ConfigError

TAG_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "checkpoint.json"


def tag_for(step: int) -> str:
    """The tag (directory name) of the checkpoint at ``step``: ``step_00001000``."""
    return f"step_{step:08d}"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`data_prep.files.atomic_path`; a full disk raises
    :class:`data_prep.files.DiskFullError`)."""
    with atomic_path(path, what="checkpoint file") as tmp:
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
    if not well_formed or not isinstance(files, dict):
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
    """A checkpoint or an export of the run could not be written (a full disk, an I/O error, an export folder that
    may not be replaced); the last complete checkpoint is intact. Exit status 1, one line."""


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def estimate_checkpoint_bytes(
    trainable: int, other_bytes: int = 0, *, weight_bytes: int = 4, fp32_master: bool = True
) -> int:
    """Bytes one checkpoint takes on the file system, all ranks together (each rank writes about 1/ranks of it).

    ``trainable * (weight_bytes + 8 + 4 * fp32_master) + other_bytes``: the module's weights at their dtype
    (``weight_bytes``: 4 fp32, 2 fp16/bf16; in ``mp_rank_00_model_states.pt``), AdamW's two fp32 moments (8 bytes),
    and the fp32 master copy that ZeRO-1/2/3 and mixed precision keep (4 bytes; not ZeRO-0 fp32), in the
    ``*_optim_states.pt`` partitions; ``other_bytes``: frozen parameters and buffers saved with the module. The RNG
    files, ``hf/`` and ``checkpoint.json`` add a few hundred KiB. Measured on the tiny BERT run (ZeRO-2, fp32, 42,929
    trainable parameters): 16 bytes per parameter estimated, 17.4 written (with the RNG and ``hf/`` files).
    """
    return int(trainable) * (int(weight_bytes) + 8 + (4 if fp32_master else 0)) + int(other_bytes)


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
        self._preflight_done = False
        self._config: dict = {}

    def should_save(self, step: int, *, last: bool, stopping: bool) -> bool:
        """Whether to checkpoint after ``step``: at the interval, at the last step, and when the ranks stop."""
        return stopping or last or bool(self.save_interval and step % self.save_interval == 0)

    def save(
        self, engine, step: int, client_state: dict[str, Any], write_extra: Callable[[Path], None] | None = None
    ) -> Path:
        """Save a checkpoint on every rank (collective: all ranks must call it at the same step).

        ``client_state`` goes into DeepSpeed's model-states file; each rank adds its RNG states; rank 0 runs
        ``write_extra(tag_dir)`` (the ``hf/`` folder), then, once every rank is done, writes ``checkpoint.json``
        and moves ``latest``, then deletes checkpoints beyond ``keep_last``. Returns the tag directory. The first
        save of a fresh run without ``student_init/`` checks the free space first (:meth:`preflight_engine`).

        Raises :class:`CheckpointError` on every rank when a rank could not write (one line: the folder, the space
        needed and free, and that the last complete checkpoint is intact); ``latest`` then still names that one.
        """
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.rank == 0:
            self.preflight_engine(engine)
            if tag_dir.exists():  # a cut-off save of the same step, or a re-save: start clean
                shutil.rmtree(tag_dir)
        self.all_ok(True)
        error: BaseException | None = None
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
            atomic_torch_save(rng_state(), tag_dir / f"rng_rank_{self.rank:05d}.pt")
            if self.rank == 0 and write_extra is not None:
                write_extra(tag_dir)
        except Exception as e:
            if not (isinstance(e, DiskFullError) or is_disk_full(e)):
                raise
            error = e.__cause__ if isinstance(e, DiskFullError) and e.__cause__ else e
        if not self.all_ok(error is None):
            raise self._save_failed(tag_dir, error)
        if self.rank == 0:
            self._write_manifest(tag_dir, step, client_state)
        self.all_ok(True)
        self.last_saved = step
        return tag_dir

    def _write_manifest(self, tag_dir: Path, step: int, client_state: dict[str, Any]) -> None:
        """Rank 0, after every rank wrote: ``checkpoint.json`` (every file's size and sha256), then ``latest``, then
        the pruning of older tags."""
        files = {}
        for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
            files[str(path.relative_to(tag_dir))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = {
            "step": step,
            "tag": tag_dir.name,
            "world_size": self.world_size,
            "files": files,
            "config": client_state.get("config"),
        }
        try:
            atomic_write_text(tag_dir / MANIFEST, json.dumps(manifest, indent=1), what="checkpoint manifest")
            atomic_write_text(self.run.latest_file, tag_dir.name, what="checkpoint pointer")
        except DiskFullError as e:
            raise self._save_failed(tag_dir, e.__cause__ or e) from None
        self._prune(keep=tag_dir.name)

    def _save_failed(self, tag_dir: Path, error: BaseException | None) -> CheckpointError:
        """The error of a failed save; rank 0 removes the partial tag (its space is needed, and it is not
        resumable)."""
        complete = [t for _, t in list_tags(self.root) if (self.root / t / MANIFEST).is_file() and t != tag_dir.name]
        size = _folder_bytes(self.root / complete[0]) if complete else _folder_bytes(tag_dir)
        if self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        intact = (
            f"the last complete checkpoint {self.root / complete[0]} is intact and a rerun resumes from it"
            if complete
            else "there is no complete checkpoint yet"
        )
        return CheckpointError(disk_full_message("checkpoint", tag_dir, error, needed=size, intact=intact))

    # -- free space --------------------------------------------------------------------------------------------

    def preflight_space(self, checkpoint_bytes: int, export_bytes: int) -> str | None:
        """Warn (one ``[pretrain] WARNING`` line naming the folder) when the run directory's file system has less
        free space than the run will still write; once per manager, on rank 0. Returns the warning or None.

        The run writes ``checkpoint_bytes x (keep_last + 1)`` (a new checkpoint is complete before the oldest one is
        deleted) plus ``export_bytes x 2`` (``student_init/`` and ``student/``); what ``checkpoints/``,
        ``student_init/`` and ``student/`` already hold is counted as available (it is replaced or pruned).
        :func:`estimate_checkpoint_bytes` gives ``checkpoint_bytes`` before the first save.
        """
        if self._preflight_done or self.rank != 0:
            return None
        self._preflight_done = True
        planned = int(checkpoint_bytes) * (self.keep_last + 1) + int(export_bytes) * 2
        held = sum(_folder_bytes(p) for p in (self.root, self.run.student_init, self.run.student) if p.is_dir())
        free = free_bytes(self.run.root)
        if free is None or free + held >= planned:
            return None
        from pretrain.runtime import warn

        msg = (
            f"{self.run.root}: the run will write about {planned / MIB:,.1f} MiB (checkpoints of about "
            f"{checkpoint_bytes / MIB:,.1f} MiB x train.keep_last {self.keep_last} + 1, and the student_init/ and "
            f"student/ exports of {export_bytes / MIB:,.1f} MiB each) and {(free + held) / MIB:,.1f} MiB are "
            f"available on that file system; free space, lower train.keep_last, or choose another train.output_dir"
        )
        warn(msg)
        return msg

    def preflight_engine(self, engine) -> str | None:
        """:meth:`preflight_space` from the DeepSpeed engine's module (before the first save of a run whose start did
        not check: ``train.export_init`` off): trainable parameters at their dtype, frozen ones and buffers."""
        if self._preflight_done:
            return None
        module = getattr(engine, "module", engine)
        trainable = [p for p in module.parameters() if p.requires_grad]
        frozen = [p for p in module.parameters() if not p.requires_grad] + list(module.buffers())
        weight = trainable[0].element_size() if trainable else 4
        stage = int(getattr(engine, "zero_optimization_stage", lambda: 0)() or 0)
        n = sum(int(getattr(p, "ds_numel", p.numel())) for p in trainable)  # ZeRO-3 partitions: ds_numel
        other = sum(int(getattr(t, "ds_numel", t.numel())) * t.element_size() for t in frozen)
        ckpt = estimate_checkpoint_bytes(n, other, weight_bytes=weight, fp32_master=stage > 0 or weight < 4)
        return self.preflight_space(ckpt, n * 4)

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
        self._config = mine
        if tag is None:
            return None
        if manifest is None:  # find_resume returns both or neither
            raise RuntimeError(f"checkpoint {tag}: resume point without its manifest")
        ckpt = sum(int(i["bytes"]) for i in manifest["files"].values())
        states = manifest["files"].get("mp_rank_00_model_states.pt", {}).get("bytes", 0)
        self.preflight_space(ckpt, _folder_bytes(self.run.student_init) if self.run.student_init.is_dir() else states)
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
        ``(folder, exported now)``. Not collective (the caller adds the barrier). Raises :class:`CheckpointError`
        (one line) for a full disk or a ``student/`` folder the export may not replace."""
        from pretrain.export import export_checkpoint

        tag = self.run.latest_tag()
        if tag is None:
            raise FileNotFoundError(f"{self.run.latest_file}: no checkpoint to export")
        if self.run.finished():
            return self.run.student, False
        try:
            export_checkpoint(self.root, self.run.student, tag)
        except DataPrepError as e:  # DiskFullError, OutputExistsError: one line, exit status 1
            raise CheckpointError(str(e)) from e
        return self.run.student, True

    def export_init(self, student: torch.nn.Module, write_meta: Callable[[Path], None], info: dict) -> Path | None:
        """Save ``student`` (before training) to ``student_init/`` once (rank 0); None when it exists already.

        First checks the free space for the run (:meth:`preflight_space`, the checkpoint estimated from the
        student's parameters and the config's precision and ZeRO stage). Raises :class:`CheckpointError` (one line)
        for a full disk or a folder the export may not replace."""
        import tempfile

        from pretrain.export import save_student

        if self.run.student_init.is_dir():
            return None
        self.preflight_space(*self._estimate_from(student))
        try:
            with tempfile.TemporaryDirectory(dir=self.run.root) as meta:
                write_meta(Path(meta))
                save_student(student, self.run.student_init, Path(meta), info)
        except DataPrepError as e:
            raise CheckpointError(str(e)) from e
        return self.run.student_init

    def _estimate_from(self, student: torch.nn.Module) -> tuple[int, int]:
        """``(checkpoint bytes, export bytes)`` of a run training ``student`` with the resolved config seen by
        :meth:`resume_point` (precision, ZeRO stage): :func:`estimate_checkpoint_bytes`."""
        ds = self._config.get("deepspeed") or {}
        mixed = any(bool((ds.get(k) or {}).get("enabled")) for k in ("fp16", "bf16"))
        stage = int((ds.get("zero_optimization") or {}).get("stage") or 0)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        frozen = sum(p.numel() * 4 for p in student.parameters() if not p.requires_grad)
        ckpt = estimate_checkpoint_bytes(
            trainable, frozen, weight_bytes=2 if mixed else 4, fp32_master=mixed or stage > 0
        )
        return ckpt, sum(p.numel() * 4 for p in student.parameters())
