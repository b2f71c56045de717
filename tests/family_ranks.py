"""One multi-rank launch that trains several families in turn (tests/test_families.py starts it with DeepSpeed's
launcher, 2 CPU ranks): for each family a straight run, then the same run stopped by SIGTERM to every rank after step
``stop`` and resumed by a second Trainer on the same run directory.

``python -m tests.family_ranks PLAN.json``: PLAN is ``{"config": path, "stop": k, "families": [{"name", "root",
"overrides"}]}``. Each family's result goes to ``ROOT/result.json`` on rank 0: ``{"ok": true}`` or ``{"error":
traceback}``; after the straight run rank 0 also saves the trained student's outputs on :data:`TEXTS` to
``ROOT/trained_outputs.pt`` (``{"input_ids", "attention_mask", "output"}``: logits for an MLM student, else the last
hidden state), which the test compares with the export's after reload. A family that fails on both ranks (a refusal
at set-up) lets the next one run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France, and Berlin of Germany."]


def _trained_outputs(trainer, path: Path) -> None:
    import torch

    student = trainer.model.student
    enc = trainer.tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    was_training = student.training
    student.eval()
    with torch.no_grad():
        out = student(**batch)
    student.train(was_training)
    tensor = out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.save({**batch, "output": tensor.detach().float()}, path)


def _train(config: str, overrides: list[str], stop_after: int | None = None, outputs: Path | None = None) -> None:
    from pretrain.config import load
    from pretrain.trainer import Trainer

    trainer = Trainer(load(config, overrides))
    try:
        trainer.setup()
        if stop_after is not None:
            step_once = trainer.step_once

            def signalled(*a, **k):
                if trainer.step == stop_after:
                    os.kill(os.getpid(), signal.SIGTERM)  # every rank, as a scheduler's preemption does
                return step_once(*a, **k)

            vars(trainer)["step_once"] = signalled  # an instance attribute over the method
        trainer.fit()
        if outputs is not None and trainer.is_main:
            _trained_outputs(trainer, outputs)
    finally:
        trainer.close()


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--local_rank")]  # added by the DeepSpeed launcher
    plan = json.loads(Path(args[0]).read_text())
    rank = int(os.environ.get("RANK", 0))
    for fam in plan["families"]:
        root = Path(fam["root"])
        over = fam["overrides"]
        try:
            _train(
                plan["config"], [*over, f"train.output_dir={root / 'straight'}"], outputs=root / "trained_outputs.pt"
            )
            stopped = [*over, f"train.output_dir={root / 'stopped'}"]
            _train(plan["config"], stopped, stop_after=plan["stop"])
            _train(plan["config"], stopped)  # the same command again: resumes
            result: dict[str, object] = {"ok": True}
        except Exception:  # recorded for the test, which names the family
            result = {"error": traceback.format_exc()}
        if rank == 0:
            (root / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
