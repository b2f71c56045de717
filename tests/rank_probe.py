"""A rank entry point for tests/test_rank_invariants.py: ``python -m pretrain.main`` that records what each rank fed
its module (no tests here).

    deepspeed --num_gpus 2 --module tests.rank_probe --config C [section.key=value ...]

Every rank runs the real trainer (``pretrain.main.main``); the only difference is that
:meth:`pretrain.recipes.PretrainRecipe.inputs` is wrapped to keep, per micro-batch, the loader's batch
(``input_ids`` / ``attention_mask``, int64 [B, L]), the masker's output (``masked`` ids, ``labels``, int64 [B, L]), and
the (step, rank, micro_step) the trainer passed, plus once the masker's selection log-probabilities (float32 [V]). At
the end each rank writes them to ``train.output_dir/probe/rank_{R}.pt`` (R: the process's own rank from the launcher,
``$RANK``, not the one the trainer passed on), so the test can check the data each rank really read and masked.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import torch

PROBE_DIR = "probe"


def probe_file(run_dir: str | Path, rank: int) -> Path:
    """Where rank ``rank`` of the probed run in ``run_dir`` writes its record."""
    return Path(run_dir) / PROBE_DIR / f"rank_{rank}.pt"


def main(argv: list[str] | None = None) -> int:
    """``pretrain.main.main(argv)`` with the recipe's inputs recorded (module docstring); returns its exit code."""
    from data_prep.files import atomic_write_bytes
    from pretrain import main as entry
    from pretrain import trainer as trainer_module
    from pretrain.recipes import PretrainRecipe

    micro_batches: list[dict[str, Any]] = []
    record: dict[str, Any] = {"micro_batches": micro_batches, "masker_log_probs": None}
    original_inputs, original_run = PretrainRecipe.inputs, trainer_module.run

    def inputs(self, batch, device, *, step, rank, micro_step):
        masked, mask, labels = original_inputs(self, batch, device, step=step, rank=rank, micro_step=micro_step)
        if record["masker_log_probs"] is None:
            record["masker_log_probs"] = self.masker._cpu["log_probs"].clone()
        micro_batches.append(
            {
                "step": step,
                "rank": rank,
                "micro_step": micro_step,
                "input_ids": batch["input_ids"].clone(),
                "attention_mask": batch["attention_mask"].clone(),
                "masked": masked.detach().cpu().clone(),
                "labels": labels.detach().cpu().clone(),
            }
        )
        return masked, mask, labels

    def run(cfg) -> int:
        try:
            return original_run(cfg)
        finally:
            buf = io.BytesIO()
            torch.save(record, buf)
            path = probe_file(cfg.train.output_dir, int(os.environ.get("RANK", "0")))
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buf.getvalue(), what="probe record")

    PretrainRecipe.inputs = inputs  # type: ignore[method-assign]
    trainer_module.run = run
    return entry.main(argv)


if __name__ == "__main__":
    sys.exit(main())
