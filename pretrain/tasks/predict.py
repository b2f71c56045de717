"""The one prediction loop of the labeled tasks: a model's outputs for encoded examples, batch by batch, without grad.

Fine-tuning's evaluation and probing's embeddings (:mod:`pretrain.tasks.finetune`, :mod:`pretrain.tasks.probe`),
the task-distillation teacher logits and in-run evaluation (:mod:`pretrain.tasks.recipe`,
:mod:`pretrain.tasks.validator`) and the saved-classifier scores (:mod:`pretrain.tasks.scoring`) all run it; they
differ only in the batch order they give (length-sorted: :func:`pretrain.tasks.examples.sorted_batches`) and in what
they read from the model's output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from pretrain.losses import mean_pool
from pretrain.tasks.examples import MODEL_INPUTS, Examples, collate

Head = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]


def logits_of(output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A sequence classifier's logits [B, C] as float32."""
    return output.logits.float()


def mean_pooled(output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """An encoder's mean-pooled last hidden states [B, hidden] (:func:`pretrain.losses.mean_pool`: special tokens
    included, padding excluded)."""
    return mean_pool(output.last_hidden_state, batch["attention_mask"])


def run_batches(
    module: torch.nn.Module | Callable[..., Any],
    data: Examples,
    batches: Iterable[np.ndarray],
    *,
    pad_id: int,
    device: torch.device | str,
    multiple: int = 1,
    segment_ids: bool = True,
    head: Head = logits_of,
) -> np.ndarray:
    """``head(module(**batch), batch)`` for every batch of example indices, gathered into [n, ...] float32 in example
    order (rows of examples in no batch stay 0; [n, 0] when there is no batch).

    Each batch is :func:`pretrain.tasks.examples.collate`\\ d (padded to ``multiple``; segment ids when ``segment_ids``
    and ``data`` has them), moved to ``device`` and run under ``torch.no_grad`` (callers may add
    ``torch.inference_mode``). The module's mode (train / eval) is left as it is.
    """
    out: np.ndarray | None = None
    with torch.no_grad():
        for idx in batches:
            b = collate(data, idx, pad_id, multiple=multiple, segment_ids=segment_ids)
            kw = {k: b[k].to(device) for k in MODEL_INPUTS if k in b}
            y = head(module(**kw), kw).cpu().numpy()
            if out is None:
                out = np.zeros((len(data), *y.shape[1:]), dtype=np.float32)
            out[idx] = y
    return np.zeros((len(data), 0), dtype=np.float32) if out is None else out


def predictions(logits: np.ndarray, regression: bool) -> np.ndarray:
    """Predictions [n] from logits [n, C]: the first output (float32) for regression, else the arg-max class (int64)."""
    if regression:
        return np.ascontiguousarray(logits[:, 0]) if logits.shape[1] else np.zeros(len(logits), dtype=np.float32)
    return logits.argmax(-1).astype(np.int64) if logits.shape[1] else np.zeros(len(logits), dtype=np.int64)
