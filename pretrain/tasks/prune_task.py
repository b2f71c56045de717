"""Width (and depth) pruning of a saved sequence classifier on its task's own training examples.

:func:`prune_classifier` keeps, of a ``*ForSequenceClassification`` folder (e.g. a task-distilled student), the
layers ``layers`` and in them the hidden channels, attention heads and feed-forward neurons that matter most on a
calibration sample of the task's train split: the Minitron activation importance of :mod:`pretrain.prune`
(docs/pruning.md), applied to the encoder; the classification head reads the pooled hidden channels, so its weight
keeps the columns of the kept channels (the pooler is sliced by :mod:`pretrain.prune`'s rules). The result is a
standard ``*ForSequenceClassification`` folder (smaller ``hidden_size`` / ``num_attention_heads`` /
``intermediate_size`` / ``num_hidden_layers``, the label names kept) that task distillation recovers from with
``task.student=FOLDER task.head=new`` (the folder's head is loaded with the encoder: ``from_pretrained`` reads every
weight it has). docs/task-distillation.md has the moonshot this serves.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.files import atomic_dir, atomic_write_text
from pretrain.prune import Batch, build_pruned
from pretrain.schema import ConfigError
from pretrain.tasks.base import Task
from pretrain.tasks.examples import collate, encode


def task_calibration(
    tokenizer: Any, task: Task, *, n: int = 256, seed: int = 0, max_length: int = 128, batch_size: int = 32
) -> list[Batch]:
    """``n`` examples of ``task``'s train split (all when it has fewer), drawn without replacement with
    ``numpy.random.default_rng(seed)`` and kept in split order, as ``{"input_ids", "attention_mask"}`` int64
    ``[B, L]`` micro-batches of ``batch_size`` padded to a multiple of 8 (the pruning importance's sample). Raises
    :class:`ConfigError` when ``n < 1`` or the task has no train examples."""
    if n < 1:
        raise ConfigError(f"calibration examples: {n} must be >= 1 (the pruning importance needs a sample)")
    if "train" not in task.splits or not len(task.splits["train"].texts):
        raise ConfigError(f"{task.name}: no train examples to measure the pruning importance on")
    data = encode(tokenizer, task.splits["train"], max_length, segment_ids=False)
    total = len(data)
    pick = np.arange(total) if n >= total else np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    out = []
    for i in range(0, len(pick), batch_size):
        b = collate(data, pick[i : i + batch_size], tokenizer.pad_token_id, multiple=8, segment_ids=False)
        out.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    return out


def _classifier_state(model: Any, base_state: dict[str, torch.Tensor], channels: list[int]) -> dict[str, torch.Tensor]:
    """The pruned classifier's state: the pruned encoder's tensors under the model's base prefix, and every head
    tensor of ``model`` outside the encoder with its input (last) axis cut to ``channels`` when it had the hidden
    size (BERT's ``classifier``), whole otherwise."""
    prefix = model.base_model_prefix
    state = {f"{prefix}.{k}": v for k, v in base_state.items()}
    hidden = model.config.hidden_size
    for k, v in model.state_dict().items():
        if k.startswith(prefix + "."):
            continue
        if v.dim() == 2 and v.shape[1] == hidden:
            v = v.index_select(1, torch.tensor(channels))
        elif v.dim() != 1 or "classifier" not in k:
            raise ConfigError(f"{k}: a head tensor of shape {tuple(v.shape)} this pruning cannot slice (BERT only)")
        state[k] = v.detach().float().contiguous()
    return state


def prune_classifier(
    model_dir: str | Path,
    out_dir: str | Path,
    task: Task,
    *,
    layers: Sequence[int] | None = None,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
    calibration: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Prune the classifier folder ``model_dir`` into ``out_dir`` (written atomically: weights, config with the
    label names, tokenizer, ``prune.json``). ``layers``: the folder's layers kept (0-based; None = all); the sizes
    as ``student.hidden_size`` / ``num_attention_heads`` / ``intermediate_size`` of docs/pruning.md (None = the
    model's ratio, whole heads of the model's head size). Returns the prune record (:func:`pretrain.prune.build_pruned`
    's, with the calibration source). Raises :class:`ConfigError` for bad sizes or layers, or a head other than
    BERT's (a linear layer on the pooled hidden channels)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    depth = model.config.num_hidden_layers
    layer_map = list(range(depth)) if layers is None else [int(x) for x in layers]
    if not layer_map or any(not 0 <= x < depth for x in layer_map):
        raise ConfigError(f"layers {layer_map}: give layers of the model, 0 to {depth - 1}")
    sample = task_calibration(tokenizer, task, n=calibration, seed=seed)
    base, record = build_pruned(
        model.base_model,
        layer_map,
        sample,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
    )
    config = copy.deepcopy(model.config)
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers"):
        setattr(config, key, getattr(base.config, key))
    student = type(model)(config)
    channels = record["prune"]["hidden_channels"]
    student.load_state_dict(_classifier_state(model, base.state_dict(), channels), strict=True)
    record["prune"]["calibration"]["source"] = f"train split of {task.name}, drawn with seed {seed}"
    record["source"] = str(model_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / "prune.json", json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.tasks.prune_task MODEL_DIR OUT_DIR --task NAME [--layers 0,1,2] [--hidden-size N]
    [--num-attention-heads N] [--intermediate-size N] [--calibration N] [--seed N] [--max-train N]``:
    :func:`prune_classifier`. Exit 0, or 2 with the message for bad input."""
    import argparse
    import sys

    from data_prep.errors import DistillError
    from pretrain.tasks import SplitConfig, load_task

    p = argparse.ArgumentParser(prog="python -m pretrain.tasks.prune_task", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="a saved *ForSequenceClassification folder (e.g. a run's student/)")
    p.add_argument("out_dir", help="the pruned classifier's folder (replaced)")
    p.add_argument("--task", required=True, help="the task whose train split is the calibration sample")
    p.add_argument("--layers", help="the model's layers kept, comma-separated (default: all)")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-attention-heads", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--calibration", type=int, default=256, help="train examples for the importance (default 256)")
    p.add_argument("--seed", type=int, default=0, help="draws the calibration sample")
    p.add_argument("--max-train", type=int, help="the train split's cap, as task.max_train_examples (default: all)")
    a = p.parse_args(argv)
    try:
        layers = [int(x) for x in a.layers.split(",")] if a.layers else None
        record = prune_classifier(
            a.model_dir,
            a.out_dir,
            load_task(a.task, split=SplitConfig(max_train=a.max_train, max_eval=1000)),
            layers=layers,
            hidden_size=a.hidden_size,
            num_attention_heads=a.num_attention_heads,
            intermediate_size=a.intermediate_size,
            calibration=a.calibration,
            seed=a.seed,
        )
    except (DistillError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{record['notes'][0]} -> {a.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
