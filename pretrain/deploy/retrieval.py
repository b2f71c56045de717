"""The run's retrieval protocol on ONNX graphs: the report's held-out document halves, embedded by ONNX Runtime.

``pretrain.evaluate`` scores a sentence encoder by recall@1 of the first half of each held-out document finding its
second half (docs/metrics.md). :func:`run_halves` rebuilds exactly those halves from the report's ``meta.retrieval``
(the same documents, sample seed, token cap), so the fp32 ONNX student reproduces the report's recall@1 and the int8
one is scored on the same task; :func:`calibration_batches` gives static quantization its batches from the run's
shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pretrain.deploy.common import DeployError
from pretrain.deploy.verify import OnnxRunner


def run_halves(data_dir: str | Path, retrieval_meta: dict[str, Any], split: str = "valid", seed: int = 0):
    """(halves as one list: all first halves then all second halves, 1-D int64 CLS ... SEP; pad id) of the report's
    retrieval evaluation: ``retrieval_meta`` is report.json's ``meta.retrieval`` (num_documents, min_tokens,
    max_content_tokens), ``seed`` the evaluation's sample seed (``pretrain.evaluate.EvalSettings.seed``, 0).

    Raises :class:`DeployError` when the shards cannot be opened or the meta lacks a key."""
    from pretrain.data import open_split
    from pretrain.evaluate import sample_documents, split_halves
    from pretrain.schema import ConfigError

    try:
        ds = open_split(data_dir, split, key="--data", verify=False)
        k, min_tokens = int(retrieval_meta["num_documents"]), int(retrieval_meta["min_tokens"])
        max_content = int(retrieval_meta["max_content_tokens"])
    except ConfigError as e:
        raise DeployError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise DeployError(f"report.json meta.retrieval {retrieval_meta!r}: missing or bad key ({e})") from None
    tok = ds.manifest["tokenizer"]
    docs, _ = sample_documents(ds.documents(), k=k, min_tokens=min_tokens, seed=seed)
    halves = [
        split_halves(d, max_content=max_content, cls_id=tok["cls_token_id"], sep_id=tok["sep_token_id"]) for d in docs
    ]
    return [h[0] for h in halves] + [h[1] for h in halves], int(tok["pad_token_id"])


def onnx_embeddings(
    runner: OnnxRunner, seqs: list[np.ndarray], pad_id: int, batch_size: int = 32, pooling: str = "mean"
) -> np.ndarray:
    """L2-normalised sentence embeddings float32 ``[len(seqs), hidden]`` of token sequences from an encoder graph
    (``last_hidden_state``), batched longest first like ``pretrain.evaluate.embed``; ``pooling``: mean (over non-pad
    tokens, special tokens included), cls or max."""
    from pretrain.tasks.examples import Examples, collate, sorted_batches

    data = Examples(list(seqs))
    out: np.ndarray | None = None
    for idx in sorted_batches(data.lengths, batch_size):
        b = collate(data, idx, pad_id, segment_ids=False)
        feed = {"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()}
        hidden, mask = runner(feed), feed["attention_mask"][..., None].astype(np.float32)
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "max":
            pooled = np.where(mask > 0, hidden, -np.inf).max(1)
        else:
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1.0)
        if out is None:
            out = np.zeros((len(seqs), hidden.shape[-1]), np.float32)
        out[idx] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return out if out is not None else np.zeros((0, 0), np.float32)


def recall_at_1(emb: np.ndarray) -> float:
    """recall@1 of ``emb`` ``[2n, d]`` (first n: queries, last n: their keys, L2-normalised): the fraction of queries
    whose most cosine-similar key is their own, as ``pretrain.evaluate.recall_at_1``."""
    n = len(emb) // 2
    return float(((emb[:n] @ emb[n:].T).argmax(1) == np.arange(n)).mean())


def calibration_batches(
    data_dir: str | Path, split: str = "train", batches: int = 8, batch_size: int = 16, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``batches`` batches of ``batch_size`` sequences drawn (fixed ``seed``) from ``split`` of the run's shards, as
    numpy ``{input_ids, attention_mask}`` int64 ``[batch, seq]``, for :func:`pretrain.deploy.quantize
    .quantize_static_int8`. The train split by default: the valid split is where the int8 graph is then scored.
    Raises :class:`DeployError` when the shards cannot be opened."""
    from pretrain.data import open_split
    from pretrain.schema import ConfigError
    from pretrain.tasks.examples import Examples, collate

    try:
        ds = open_split(data_dir, split, key="--data", verify=False)
    except ConfigError as e:
        raise DeployError(str(e)) from None
    pad = int(ds.manifest["tokenizer"]["pad_token_id"])
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(ds), size=min(len(ds), batches * batch_size), replace=False)
    data = Examples([np.asarray(ds[int(i)], np.int64) for i in idx])
    out = []
    for i in range(0, len(data), batch_size):
        b = collate(data, np.arange(i, min(i + batch_size, len(data))), pad, segment_ids=False)
        out.append({"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()})
    return out
