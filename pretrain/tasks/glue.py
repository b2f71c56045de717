"""GLUE tasks from the Hugging Face hub (``nyu-mll/glue`` through ``datasets``; needs hub access)."""

from __future__ import annotations

import numpy as np

from pretrain.tasks.base import CLASSIFICATION, REGRESSION, Split, Task, TaskError
from pretrain.tasks.embedded import EMBEDDED

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


def load_glue(key: str) -> Task:
    """The GLUE task ``key`` with its own train / dev splits (dev reported). Raises :class:`TaskError` without hub
    access (naming the offline tasks)."""
    (f1, f2), kind, metrics = GLUE[key]
    offline = ", ".join(f"embedded:{k}" for k in EMBEDDED)
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
