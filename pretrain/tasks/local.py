"""Local ``csv:PATH`` / ``jsonl:PATH`` tasks: one file (split like the embedded tasks) or a folder of given splits."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.tasks.base import CLASSIFICATION, REGRESSION, LocalFields, Split, SplitConfig, Task, TaskError
from pretrain.tasks.splits import build, check_labels, deduplicate, normalise


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
    text_flag, pair_flag, label_flag = fields.flags
    need = {text_flag: fields.text, label_flag: fields.label}
    if fields.pair:
        need[pair_flag] = fields.pair
    missing = [f"{flag} {name!r}" for flag, name in need.items() if name not in have]
    if missing:
        raise TaskError(f"{path}: no field {', '.join(missing)}; the file has {sorted(have)}")
    if fields.pair and fields.pair == fields.text:
        raise TaskError(f"{path}: {pair_flag} {fields.pair!r} is the {text_flag}; a pair task needs two text fields")
    partner = fields.text[:-1] + "2" if fields.text.endswith("1") else None
    if not fields.pair and partner in have:
        raise TaskError(
            f"{path}: looks like a pair task ({fields.text!r} and {partner!r}) but only one text field was "
            f"given; add {pair_flag} {partner}"
        )
    texts: list[str] = []
    pairs: list[str] | None = [] if fields.pair else None
    labels: list[Any] = []
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
        raise TaskError(f"{path}: {pair_flag} {fields.pair!r} is empty in every row; a pair task needs two texts")
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
        return REGRESSION if numeric and any(x is not None and x != int(x) for x in nums) else CLASSIFICATION
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


def load_local(kind: str, spec_path: str, fields: LocalFields, cfg: SplitConfig) -> Task:
    """A ``csv:`` / ``jsonl:`` task: a folder of given splits (:func:`_load_folder`) or one file split by ``cfg``.
    Raises :class:`TaskError` for a missing or unsuitable file (names it and what to do)."""
    path = Path(spec_path).expanduser()
    name = f"{kind}:{spec_path}"
    if path.is_dir():
        return _load_folder(kind, path, name, fields)
    if not path.is_file():
        raise TaskError(f"{name}: no such file or folder")
    texts, pairs, values = _columns(_read_rows(kind, path), path, fields)
    task_kind = _label_kind(values, fields.kind, name)
    if task_kind == REGRESSION:
        labels = np.array([float(v) for v in values], dtype=np.float32)
        label_names: list[str] = []
        metrics: tuple[str, ...] = ("pearson", "spearmanr")
    else:
        labels, label_names = _label_ids(values)
        metrics = ("accuracy",)
    src = {"file": str(path), "fields": dataclasses.asdict(fields)}
    return build(name, "local", texts, labels, pairs, task_kind, label_names, metrics, cfg, src)


def _folder_files(path: Path, name: str, ext: str) -> dict[str, Path]:
    """The split files of a task folder: train, dev (or validation), test when present."""
    files = {"train": path / f"train.{ext}"}
    files["dev"] = path / f"dev.{ext}" if (path / f"dev.{ext}").is_file() else path / f"validation.{ext}"
    if (path / f"test.{ext}").is_file():
        files["test"] = path / f"test.{ext}"
    missing = [str(p) for p in list(files.values())[:2] if not p.is_file()]
    if missing:
        raise TaskError(
            f"{name}: a task folder needs train.{ext} and dev.{ext} (or validation.{ext}), "
            f"optionally test.{ext}; missing {missing}"
        )
    return files


def _load_folder(kind: str, path: Path, name: str, fields: LocalFields) -> Task:
    """A task folder: its given splits, each deduplicated; a text also in a later split is dropped from the earlier."""
    files = _folder_files(path, name, "csv" if kind == "csv" else "jsonl")
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
    check_labels(name, ys["train"], task_kind, label_names)
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
