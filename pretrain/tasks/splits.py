"""Deterministic splits of a labeled task: deduplication on normalised text, stratified train / dev / test, the caps
and the task's manifest (counts, label distribution, sha256 of each split)."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

from pretrain.tasks.base import CLASSIFICATION, REGRESSION, Split, SplitConfig, Task, TaskError


def normalise(text: str) -> str:
    """The deduplication key of a text: Unicode NFKC, lower case, runs of whitespace collapsed to one space."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def deduplicate(
    texts: Sequence[str], labels: np.ndarray, pairs: Sequence[str] | None = None, kind: str = CLASSIFICATION
) -> tuple[np.ndarray, int, int]:
    """Indices of the examples kept after deduplication on the normalised text (and pair).

    The first occurrence of each normalised text is kept; for classification, a text seen with two different labels
    is dropped altogether (its label is ambiguous). Returns ``(kept indices [m] int64 in input order, duplicates
    dropped, conflicting texts dropped)``.
    """
    first: dict[str, int] = {}
    conflict: set[str] = set()
    keys = []
    for i, t in enumerate(texts):
        key = normalise(t) if pairs is None else normalise(t) + "\x1f" + normalise(pairs[i])
        keys.append(key)
        if key in first:
            if kind == CLASSIFICATION and labels[first[key]] != labels[i]:
                conflict.add(key)
        else:
            first[key] = i
    kept = np.array(sorted(i for k, i in first.items() if k not in conflict), dtype=np.int64)
    return kept, len(texts) - len(first), len(conflict)


def _strata(labels: np.ndarray, kind: str, bins: int = 5) -> np.ndarray:
    """Stratum of each example: the class id, or the quantile bin (of ``bins``) of a regression target."""
    if kind == CLASSIFICATION:
        return np.asarray(labels, dtype=np.int64)
    edges = np.quantile(labels, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, labels, side="right").astype(np.int64)


def _stratified_take(strata: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices drawn without replacement, each stratum in proportion (largest remainders), order random."""
    classes, counts = np.unique(strata, return_counts=True)
    quota = counts * (n / len(strata))
    take = np.floor(quota).astype(np.int64)
    for j in np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]:
        take[j] += 1
    out = [rng.permutation(np.flatnonzero(strata == c))[:k] for c, k in zip(classes, take, strict=False)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def make_splits(strata: np.ndarray, *, dev: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified train / dev / test index arrays (sorted int64) over ``len(strata)`` examples.

    Each stratum (class id, or quantile bin for regression) is permuted with ``numpy.random.default_rng([seed, s])``
    and cut into ``round(n_s * test)`` test, ``round(n_s * dev)`` dev and the rest train, so the label distribution
    of every split matches the whole and the result depends only on the seed and the strata. Deduplicate first
    (:func:`deduplicate`) so that no text lands in two splits.
    """
    out: dict[str, list[np.ndarray]] = {"train": [], "dev": [], "test": []}
    for s in np.unique(strata):
        idx = np.random.default_rng([seed, int(s)]).permutation(np.flatnonzero(strata == s))
        n_test, n_dev = round(len(idx) * test), round(len(idx) * dev)
        out["test"].append(idx[:n_test])
        out["dev"].append(idx[n_test : n_test + n_dev])
        out["train"].append(idx[n_test + n_dev :])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in out.items()}


def build(
    name: str,
    family: str,
    texts: list[str],
    labels: np.ndarray,
    pairs: list[str] | None,
    kind: str,
    label_names: list[str],
    metrics: tuple[str, ...],
    cfg: SplitConfig,
    source: dict[str, Any],
    fixed_test: np.ndarray | None = None,
) -> Task:
    """Deduplicate, split (stratified; ``fixed_test``: a boolean mask [n] forcing test membership) and package."""
    n_read = len(texts)
    kept, dups, conflicts = deduplicate(texts, labels, pairs, kind)
    check_labels(name, labels[kept], kind, label_names)
    sub = Split([texts[i] for i in kept], labels[kept], None if pairs is None else [pairs[i] for i in kept])
    strata = _strata(sub.labels, kind)
    if fixed_test is None:
        idx = make_splits(strata, dev=cfg.dev, test=cfg.test, seed=cfg.seed)
        by = "class" if kind == CLASSIFICATION else "target quintile"
        method = (
            f"deduplicated on normalised text, then stratified by {by}"
            f": per stratum a permutation from numpy default_rng([seed, stratum]) gives test "
            f"{cfg.test}, dev {cfg.dev}, train the rest"
        )
    else:
        test_mask = fixed_test[kept]
        rest = np.flatnonzero(~test_mask)
        inner = make_splits(strata[rest], dev=cfg.dev / (1 - cfg.test), test=0.0, seed=cfg.seed)
        idx = {"train": rest[inner["train"]], "dev": rest[inner["dev"]], "test": np.flatnonzero(test_mask)}
        method = source.pop("test_method")
    splits = {k: sub.subset(v) for k, v in idx.items()}
    manifest = {
        "task": name,
        "source": source,
        "kind": kind,
        "metrics": list(metrics),
        "label_names": label_names,
        "split_method": method,
        "split_seed": cfg.seed,
        "rows_read": n_read,
        "duplicates_dropped": dups,
        "conflicting_labels_dropped": conflicts,
        "splits": {},
    }
    return Task(name, kind, metrics, splits, "dev", ("test",), label_names, family, manifest)


def check_labels(name: str, labels: np.ndarray, kind: str, label_names: list[str]) -> None:
    if len(labels) == 0:
        raise TaskError(f"{name}: no rows with a text and a label")
    if kind == CLASSIFICATION and len(np.unique(labels)) < 2:
        only = label_names[int(labels[0])] if label_names else labels[0]
        raise TaskError(f"{name}: the label has one class only ({only!r}); a classification task needs at least two")
    if kind == REGRESSION and np.ptp(labels) == 0:
        raise TaskError(f"{name}: every label is {labels[0]}; a regression task needs varying targets")


def cap_splits(task: Task, cfg: SplitConfig) -> Task:
    """Apply ``max_train`` / ``max_eval`` (stratified, deterministic) and finish the manifest."""
    for name, sp in list(task.splits.items()):
        cap = cfg.max_train if name == "train" else cfg.max_eval
        task.manifest["splits"][name] = {"full": _describe(sp, task)}
        if cap is not None and len(sp) > cap:
            rng = np.random.default_rng([cfg.seed, len(name), 7])
            keep = _stratified_take(_strata(sp.labels, task.kind), cap, rng)
            task.splits[name] = sp = sp.subset(np.sort(keep))
        task.manifest["splits"][name]["used"] = _describe(sp, task)
    task.manifest["sha256"] = {n: _digest(sp) for n, sp in task.splits.items()}
    return task


def _describe(sp: Split, task: Task) -> dict[str, Any]:
    if task.kind == REGRESSION:
        y = sp.labels.astype(np.float64)
        return {
            "count": len(sp),
            "label_mean": round(float(y.mean()), 4) if len(y) else None,
            "label_std": round(float(y.std()), 4) if len(y) else None,
        }
    counts = np.bincount(sp.labels, minlength=len(task.label_names))
    return {"count": len(sp), "labels": {task.label_names[i]: int(c) for i, c in enumerate(counts)}}


def _digest(sp: Split) -> str:
    h = hashlib.sha256()
    for i, t in enumerate(sp.texts):
        h.update(
            t.encode("utf-8")
            + b"\x1f"
            + (sp.pairs[i].encode("utf-8") if sp.pairs else b"")
            + b"\x1f"
            + str(sp.labels[i].item()).encode()
            + b"\n"
        )
    return h.hexdigest()
