"""The official metrics of the labeled tasks (GLUE's definitions, Wang et al. 2019) and a task's single score."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def compute_metrics(metrics: Sequence[str], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The named metrics of ``predictions`` against ``labels``, as floats (fractions / correlations, not percent).

    Args:
        metrics: names among ``accuracy``, ``f1`` (binary, positive class 1), ``matthews_correlation``, ``pearson``,
            ``spearmanr`` (the names of GLUE's metric definitions).
        predictions: [n] int class ids (classification) or float scores (regression).
        labels: [n] int class ids or float targets.

    Source: ``sklearn.metrics.accuracy_score`` / ``f1_score`` / ``matthews_corrcoef``, ``scipy.stats.pearsonr`` /
    ``spearmanr``. A correlation undefined for constant predictions is reported as 0.0.

    Raises:
        ValueError: an unknown metric name or inputs of different lengths.
    """
    from scipy import stats
    from sklearn import metrics as skm

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must be equal 1-D shapes")
    out = {}
    for name in metrics:
        if name == "accuracy":
            out[name] = float(skm.accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(skm.f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0))
        elif name == "matthews_correlation":
            out[name] = float(skm.matthews_corrcoef(labels, predictions))
        elif name in ("pearson", "spearmanr"):
            if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
                out[name] = 0.0
            else:
                fn = stats.pearsonr if name == "pearson" else stats.spearmanr
                out[name] = float(fn(predictions, labels)[0])
        else:
            raise ValueError(f"unknown metric {name!r}")
    return out


def score(results: dict[str, dict[str, float]]) -> float:
    """A task's single score: the mean of its metrics over its reported splits (``{split: {metric: value}}``).

    GLUE's convention (Wang et al. 2019): tasks with two metrics count their unweighted mean; MNLI the mean of the
    matched and mismatched accuracy.
    """
    values = [v for per_split in results.values() for v in per_split.values()]
    return float(np.mean(values)) if values else float("nan")
