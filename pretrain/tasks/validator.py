"""Task distillation's in-run evaluation: the task metric of the student (and once of the teacher) on one split."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pretrain.tasks.base import Task
from pretrain.tasks.examples import Examples
from pretrain.tasks.metrics import compute_metrics, score
from pretrain.tasks.predict import predictions, run_batches


class TaskValidator:
    """The task metric of the student (and, once, of the teacher) on one split; collective over the ranks: each rank
    predicts its rank-strided share (batches of ``micro_batch`` in split order, padded to a multiple of 8), rank 0
    gathers and scores (:func:`pretrain.tasks.compute_metrics`)."""

    def __init__(
        self,
        model: Any,
        data: Examples,
        task: Task,
        split: str,
        *,
        pad_id: int,
        micro_batch: int,
        world_size: int,
        rank: int,
        device: torch.device,
        regression: bool,
    ) -> None:
        self.model, self.data, self.task, self.split = model, data, task, split
        self.pad_id, self.micro, self.world, self.rank = pad_id, micro_batch, world_size, rank
        self.device, self.regression = device, regression
        self.teacher_metrics: dict[str, float] | None = None
        self.teacher_done = False  # the same on every rank: the teacher's predictions are gathered once

    def _predict(self, module: Any) -> tuple[np.ndarray, np.ndarray]:
        """(predictions, example indices) of this rank's share."""
        mine = np.arange(self.rank, len(self.data), self.world)
        batches = [mine[s : s + self.micro] for s in range(0, len(mine), self.micro)]
        logits = run_batches(module, self.data, batches, pad_id=self.pad_id, device=self.device, multiple=8)
        return predictions(logits, self.regression)[mine], mine

    def _gather(self, module: Any) -> np.ndarray | None:
        import torch.distributed as dist

        preds, index = self._predict(module)
        parts: list[Any] = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(parts, (preds, index))
        else:
            parts = [(preds, index)]
        if self.rank != 0:
            return None
        out = np.zeros(len(self.data), dtype=np.float32 if self.regression else np.int64)
        for p, i in parts:
            out[i.astype(np.int64)] = p
        return out

    @torch.no_grad()
    def run(self, step: int) -> dict[str, Any]:
        """Evaluate; returns the ``"split": "valid"`` record (complete on rank 0)."""
        student = self._gather(self.model.student)
        teacher = None
        if not self.teacher_done:
            teacher = self._gather(self.model.teacher)
            self.teacher_done = True
        rec: dict[str, Any] = {
            "split": "valid",
            "step": step,
            "task": self.task.name,
            "eval_split": self.split,
            "examples": len(self.data),
        }
        if self.rank != 0 or student is None:
            return rec
        labels = self.data.labels
        metrics = compute_metrics(self.task.metrics, student, labels)
        if teacher is not None:
            self.teacher_metrics = compute_metrics(self.task.metrics, teacher, labels)
            self._teacher_preds = teacher
        rec.update({f"task_{k}": v for k, v in metrics.items()})
        rec["task_score"] = score({self.split: metrics})
        rec["teacher_score"] = score({self.split: self.teacher_metrics or {}})
        if not self.regression:
            rec["agreement"] = float((student == self._teacher_preds).mean())
        return rec
