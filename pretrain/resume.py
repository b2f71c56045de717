"""Resuming a run: the checkpoint it resumes from, and loading DeepSpeed's state of it into the engine.

:meth:`ResumePoint.find` asks :meth:`pretrain.checkpoint.CheckpointManager.resume_point` on rank 0 (it reads and hashes
the checkpoint's files) and shares the answer; a checkpoint saved under ZeRO-1/2/3 on another world size loads through
DeepSpeed's universal checkpoint (:mod:`pretrain.reshard`: the engine must be created with
:func:`pretrain.reshard.with_universal_load`). :meth:`ResumePoint.load_engine` loads weights, optimizer and scheduler
state; the trainer restores its own client state (step, data cursor, counters) and the RNG states.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pretrain import reshard
from pretrain.runtime import console, on_rank0
from pretrain.schema import ConfigError

if TYPE_CHECKING:
    from pretrain.checkpoint import CheckpointManager


@dataclasses.dataclass
class ResumePoint:
    """The checkpoint a run resumes from: its ``tag``, its ``manifest`` (``checkpoint.json``: step, world size,
    files, config) and whether it loads through a universal checkpoint (``universal``)."""

    tag: str
    manifest: dict[str, Any]
    universal: bool

    @classmethod
    def find(
        cls, ckpt: CheckpointManager, config: dict[str, Any], *, allow_world_size_change: bool, stage: int
    ) -> ResumePoint | None:
        """The newest complete checkpoint of ``ckpt`` that the run of resolved ``config`` (``RunConfig.to_dict()``)
        resumes, or None for a fresh run (collective: rank 0 looks, every rank gets the answer). ``stage``: this
        run's ZeRO stage. Raises :class:`ConfigError` on every rank for another run's checkpoints, or another world
        size unless ``allow_world_size_change``."""
        found = on_rank0(
            lambda: ckpt.resume_point(config, allow_world_size_change=allow_world_size_change),
            rank=ckpt.rank,
            expected=(ConfigError,),
        )
        if found is None:
            return None
        tag, manifest = found
        return cls(tag, manifest, reshard.needs_universal(stage, manifest["world_size"], ckpt.world_size))

    def load_engine(self, engine: Any, ckpt: CheckpointManager, *, stage: int) -> dict[str, Any]:
        """Load this checkpoint into ``engine`` (collective): weights, optimizer and scheduler state; returns the
        client state the trainer saved. A universal load: rank 0 converts the checkpoint first, and discards the
        conversion afterwards. Raises ``RuntimeError`` when DeepSpeed finds nothing to load."""
        import torch.distributed as dist

        root, rank = ckpt.root, ckpt.rank
        if self.universal:  # weights and AdamW moments re-sharded for this world size (pretrain/reshard.py)
            uroot, utag = on_rank0(lambda: reshard.to_universal(root, self.tag), rank=rank)
            load_path, client = engine.load_checkpoint(str(uroot), tag=utag)
            reshard.restore_frozen(engine, uroot, utag)  # collective under ZeRO-3
            dist.barrier()
            if rank == 0:
                reshard.discard(root)
                console(
                    f"[pretrain] world size {self.manifest['world_size']} -> {ckpt.world_size} with ZeRO-{stage}: "
                    f"weights, AdamW moments, step and schedule resumed (universal checkpoint)"
                )
        else:  # the same world size, or ZeRO-0 (its optimizer state is saved whole)
            load_path, client = engine.load_checkpoint(str(root), tag=self.tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {root / self.tag}")
        return client
