"""Saved classifiers scored on a task split as they are (no fine-tuning): ``python -m pretrain.taskmode evaluate``."""

from __future__ import annotations

import time
from typing import Any

import torch

from pretrain.tasks.base import REGRESSION, Task
from pretrain.tasks.examples import encode, sorted_batches, uses_segment_ids
from pretrain.tasks.metrics import compute_metrics, score
from pretrain.tasks.predict import predictions, run_batches


def evaluate_classifier(
    model_dir: str, task: Task, split: str, *, max_length: int = 128, batch_size: int = 128, device: str = "cpu"
) -> dict[str, Any]:
    """A saved classifier's metrics on ``split`` of ``task`` as it is (no fine-tuning): ``{"metrics", "score",
    "examples_per_s", "params"}``; the same tokenization, segment-id rule, padding (multiple of 8) and metrics as the
    in-run evaluation (:class:`pretrain.tasks.validator.TaskValidator`), in length-sorted batches under
    ``torch.inference_mode``. Encoder parameters exclude the pooler and the head. Raises ``OSError`` when
    ``model_dir`` does not load."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device).eval()
    data = encode(tok, task.splits[split], max_length, uses_segment_ids(model.config))
    regression = task.kind == REGRESSION
    t0 = time.perf_counter()
    with torch.inference_mode():
        batches = sorted_batches(data.lengths, batch_size)
        logits = run_batches(model, data, batches, pad_id=tok.pad_token_id, device=device, multiple=8)
    seconds = time.perf_counter() - t0
    metrics = compute_metrics(task.metrics, predictions(logits, regression), data.labels)
    encoder = model.base_model
    return {
        "metrics": metrics,
        "score": score({split: metrics}),
        "examples_per_s": len(data) / max(seconds, 1e-9),
        "params": sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("pooler.")),
    }
