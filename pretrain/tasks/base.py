"""The types of a labeled task: :class:`Split`, :class:`Task`, how it is split (:class:`SplitConfig`) and read from
local files (:class:`LocalFields`), and the task error."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data_prep.errors import DistillError

CLASSIFICATION, REGRESSION = "classification", "regression"


class TaskError(DistillError, ValueError):
    """A user-facing task error (unknown task, unreadable or unsuitable data): the message says what to do."""

    exit_code = 2


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


@dataclasses.dataclass
class LocalFields:
    """Field names of a local ``csv:`` / ``jsonl:`` task: ``text`` (required), ``pair`` (optional second text),
    ``label``; ``kind`` ``auto`` (regression when every label is a number and one is not an integer), ``classification``
    or ``regression``."""

    text: str = "text"
    pair: str | None = None
    label: str = "label"
    kind: str = "auto"
    # how the user named the three fields, for messages: the CLI's flags, or the config's keys in task mode
    flags: tuple[str, str, str] = ("--text-field", "--pair-field", "--label-field")


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


class DownstreamError(DistillError, ValueError):
    """A user-facing error of the downstream evaluation (bad task, model, flag): the message says what to do."""

    exit_code = 2


def slug(name: str) -> str:
    """A task name as a folder name (``embedded:rotten-tomatoes`` -> ``embedded_rotten-tomatoes``): the last part of
    ``python -m pretrain.downstream --save-model DIR``'s ``DIR/<model>/<task>``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


MEAN_HEAD_FILE = "downstream_head.safetensors"  # a --head mean fine-tune's head beside its encoder's folder
