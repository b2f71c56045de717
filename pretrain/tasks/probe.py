"""Linear probes of frozen embeddings: mean-pooled last hidden states, then logistic regression (classification, the
MTEB classification protocol, Muennighoff et al. 2023) or ridge regression, regularisation chosen on dev."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pretrain.tasks.base import REGRESSION, Task
from pretrain.tasks.examples import Examples, encode, sorted_batches, uses_segment_ids
from pretrain.tasks.finetune import FinetuneConfig
from pretrain.tasks.metrics import compute_metrics, score
from pretrain.tasks.models import ModelSpec, quiet_transformers
from pretrain.tasks.predict import mean_pooled, run_batches

PROBE_C = (0.1, 1.0, 10.0, 100.0)  # LogisticRegression inverse regularisation grid, chosen on dev
PROBE_ALPHA = (0.1, 1.0, 10.0, 100.0)  # Ridge regularisation grid, chosen on dev


@torch.inference_mode()
def embed(
    model: Any, data: Examples, *, pad_id: int, batch_size: int, device: torch.device
) -> tuple[np.ndarray, float]:
    """Mean-pooled last hidden states [n, hidden] float32 of a bare encoder (``AutoModel``) over ``data``
    (:func:`pretrain.losses.mean_pool`: special tokens included, padding excluded), in length-sorted batches under
    ``torch.inference_mode`` (the one prediction loop, :func:`pretrain.tasks.predict.run_batches`); and the
    throughput in examples/s."""
    model.eval()
    segment_ids = uses_segment_ids(model)
    t0 = time.perf_counter()
    batches = sorted_batches(data.lengths, batch_size)
    out = run_batches(model, data, batches, pad_id=pad_id, device=device, segment_ids=segment_ids, head=mean_pooled)
    return out, len(data.ids) / max(time.perf_counter() - t0, 1e-9)


def _features(
    spec: ModelSpec, task: Task, cfg: FinetuneConfig, device: torch.device
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[float], float]:
    """Every split embedded once: (features {split: [n, hidden]} standardised with the train split's mean and std,
    labels {split: [n]}, the reported splits' throughputs, embedded examples per second overall)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.path)
    with quiet_transformers():
        model = AutoModel.from_pretrained(spec.path).to(device=device, dtype=torch.float32)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    feats, labels, speeds, n_embedded, t_embed = {}, {}, [], 0, 0.0
    for name, sp in task.splits.items():
        data = encode(tok, sp, cfg.max_length)
        t0 = time.perf_counter()
        feats[name], speed = embed(model, data, pad_id=pad_id, batch_size=cfg.eval_batch_size, device=device)
        t_embed += time.perf_counter() - t0
        n_embedded += len(sp)
        labels[name] = sp.labels
        if name in task.report_splits:
            speeds.append(speed)
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    feats = {k: (v - mu) / sd for k, v in feats.items()}
    return feats, labels, speeds, n_embedded / max(t_embed, 1e-9)


def probe(spec: ModelSpec, task: Task, cfg: FinetuneConfig, *, device: torch.device) -> dict[str, Any]:
    """Linear probe of frozen embeddings: embed every split once (:func:`embed`), standardise with the train split's
    mean and std, fit ``LogisticRegression(C, max_iter=1000)`` (classification; MTEB's classification protocol) or
    ``Ridge(alpha)`` (regression) on train for each value of :data:`PROBE_C` / :data:`PROBE_ALPHA`, keep the best on
    the select split (dev), report the reported splits. Returns the same keys as
    :func:`pretrain.tasks.finetune.finetune` (``seed`` None, ``epoch`` None, ``c`` / ``alpha`` chosen,
    ``embed_examples_per_s``, ``fit_seconds``)."""
    from sklearn.linear_model import LogisticRegression, Ridge

    feats, labels, speeds, embed_speed = _features(spec, task, cfg, device)
    regression = task.kind == REGRESSION
    select = task.select_split if task.select_split not in task.report_splits else None
    grid = PROBE_ALPHA if regression else PROBE_C
    t0 = time.perf_counter()
    best: tuple[float, float, Any] | None = None
    for value in grid if select is not None else (1.0,):
        clf = Ridge(alpha=value) if regression else LogisticRegression(C=value, max_iter=1000)
        clf.fit(feats["train"], labels["train"])
        dev = (
            score({select: compute_metrics(task.metrics, clf.predict(feats[select]), labels[select])})
            if select is not None
            else 0.0
        )
        if best is None or dev > best[0]:
            best = (dev, value, clf)
    if best is None:  # the grid is never empty
        raise RuntimeError("probe: no regularisation value was tried")
    dev, value, clf = best
    metrics = {s: compute_metrics(task.metrics, clf.predict(feats[s]), labels[s]) for s in task.report_splits}
    return {
        "seed": None,
        "metrics": metrics,
        "score": score(metrics),
        "dev_score": dev if select else None,
        "epoch": None,
        ("alpha" if regression else "c"): value,
        "fit_seconds": time.perf_counter() - t0,
        "embed_examples_per_s": embed_speed,
        "inference_examples_per_s": float(np.mean(speeds)),
    }
