"""Encoded labeled examples: the one example type, tokenizer encoding, the segment-id rule, collation and batch orders.

Every labeled-task path (fine-tuning, probing, task distillation, the in-run and the saved-classifier evaluation)
encodes with :func:`encode`, decides segment ids with :func:`uses_segment_ids` and pads with :func:`collate`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class Examples:
    """Tokenized examples of one split: ``ids[i]`` int64 [len_i] token ids, ``types[i]`` int64 [len_i] segment ids
    (None without segment ids), ``labels`` [n] (int64 class ids or float32 targets; empty for unlabeled sequences) and
    ``teacher_logits`` float32 [n, C] when precomputed (task distillation)."""

    ids: list[np.ndarray]
    types: list[np.ndarray] | None = None
    labels: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    teacher_logits: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> int:
        return i  # a loader collates by index (collate)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example [n] int64."""
        return np.array([len(x) for x in self.ids], dtype=np.int64)

    def digest(self) -> str:
        """sha256 of the token ids, segment ids and labels (the teacher-logit cache's input key)."""
        h = hashlib.sha256()
        for i, ids in enumerate(self.ids):
            h.update(ids.tobytes())
            if self.types is not None:
                h.update(self.types[i].tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()


def uses_segment_ids(model_or_config: Any) -> bool:
    """The segment-id rule: True when the model takes BERT-style ``token_type_ids`` (``type_vocab_size`` > 1 in its
    config and, given a model rather than a config, ``token_type_ids`` in its ``forward`` signature)."""
    config = getattr(model_or_config, "config", model_or_config)
    if (getattr(config, "type_vocab_size", 0) or 0) <= 1:
        return False
    forward = getattr(model_or_config, "forward", None)
    return forward is None or "token_type_ids" in inspect.signature(forward).parameters


def encode(tokenizer: Any, split: Any, max_length: int, segment_ids: bool = True) -> Examples:
    """Tokenise a :class:`pretrain.tasks.Split` (texts, optional pairs) with truncation to ``max_length`` tokens;
    segment ids are kept when ``segment_ids`` (see :func:`uses_segment_ids`) and the tokenizer gives them."""
    enc = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length, return_token_type_ids=segment_ids)
    types = enc.get("token_type_ids") if segment_ids else None
    return Examples(
        [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]],
        None if types is None else [np.asarray(x, dtype=np.int64) for x in types],
        np.asarray(split.labels),
    )


def collate(
    data: Examples,
    index: Sequence[int] | np.ndarray,
    pad_id: int,
    *,
    multiple: int = 1,
    segment_ids: bool = True,
    regression: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Right-pad the examples ``index`` into a batch: ``input_ids`` / ``attention_mask`` int64 [B, L], L = the longest
    rounded up to ``multiple``; ``token_type_ids`` int64 [B, L] when ``segment_ids`` and ``data`` has them;
    ``labels`` [B] (int64, float32 for regression) when ``regression`` is not None; ``teacher_logits`` float32 [B, C]
    when precomputed."""
    index = [int(i) for i in index]
    width = -(-max(len(data.ids[i]) for i in index) // multiple) * multiple
    ids = np.full((len(index), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    types = None if data.types is None or not segment_ids else np.zeros_like(ids)
    for r, i in enumerate(index):
        n = len(data.ids[i])
        ids[r, :n], mask[r, :n] = data.ids[i], 1
        if types is not None:
            types[r, :n] = data.types[i]  # type: ignore[index]  # data.types is not None when types is not
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if types is not None:
        out["token_type_ids"] = torch.from_numpy(types)
    if regression is not None:
        out["labels"] = torch.from_numpy(data.labels[index].astype(np.float32 if regression else np.int64))
    if data.teacher_logits is not None:
        out["teacher_logits"] = torch.from_numpy(data.teacher_logits[index])
    return out


def length_grouped_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, mega: int = 50
) -> list[np.ndarray]:
    """Training batches grouped by length (the ``group_by_length`` sampler of transformers): a random permutation is
    cut into mega-batches of ``mega * batch_size``, each sorted by length, cut into batches, and the batch order is
    shuffled. Every example appears exactly once; padding waste is small while the order stays random."""
    perm = rng.permutation(len(lengths))
    batches = []
    for s in range(0, len(perm), mega * batch_size):
        chunk = perm[s : s + mega * batch_size]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches over examples sorted by length (longest first, stable): least padding."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
