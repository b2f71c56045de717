"""Loading the teacher's fast tokenizer and encoding document batches into flat numpy arrays.

The tokenization itself is the Hugging Face ``tokenizers`` (Rust) backend of the ``transformers`` tokenizer, called
exactly as ``tokenizer(texts, add_special_tokens=False, split_special_tokens=True)`` calls it (one
``encode_batch`` per batch), with truncation and padding switched off. Special-token strings that occur in raw text
(e.g. a literal ``[SEP]`` or ``</s>``) are tokenized as text, so the only control tokens in the shards are the
ones packing adds.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from typing import Any

import numpy as np

from data_prep.errors import DataPrepError


def load_tokenizer(name_or_path: str) -> Any:
    """Load a fast ``transformers`` tokenizer (``AutoTokenizer``) from a hub name, a local folder or ``embedded:*``.

    Raises:
        DataPrepError: a local path that does not exist, a tokenizer that cannot be loaded, or one that has no fast
            (Rust) implementation.
    """
    from data_prep.embedded import resolve_model

    path = resolve_model(name_or_path)
    if path.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(path)):
        raise DataPrepError(
            f"--tokenizer {name_or_path!r}: no such file or directory {path!r}; give a local "
            "tokenizer/model folder, a Hugging Face hub name, or embedded:minilm-l6"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... depending on what is missing
        raise DataPrepError(
            f"--tokenizer {name_or_path!r}: cannot load a tokenizer from {path!r} "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}); "
            "give a folder with tokenizer.json (or vocab files), a Hugging Face hub name, or "
            "embedded:minilm-l6"
        ) from None
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise DataPrepError(
            f"--tokenizer {name_or_path!r}: {type(tok).__name__} has no fast (Rust) tokenizer; "
            "data_prep needs one (save it with tokenizer.json)"
        )
    return tok


def wrap_ids(tok: Any, name: str = "the tokenizer") -> tuple[int, int]:
    """The ids that begin and end every packed sequence: ``(cls, sep)``, else ``(bos, eos)``.

    BERT: ``([CLS], [SEP])``; RoBERTa: ``(<s>, </s>)``. Raises DataPrepError when the tokenizer has neither pair.
    """
    cls = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    if cls is None or sep is None:
        raise DataPrepError(
            f"{name}: needs a cls/sep (or bos/eos) token to pack sequences as CLS ... SEP, but "
            f"cls={tok.cls_token!r} sep={tok.sep_token!r} bos={tok.bos_token!r} "
            f"eos={tok.eos_token!r}; use a BERT/RoBERTa-style tokenizer or add these tokens"
        )
    return int(cls), int(sep)


def tokenizer_record(tok: Any, name_or_path: str) -> dict:
    """The manifest's ``tokenizer`` entry: name, ``vocab_size`` (= ``len(tok)``) and the special token ids.

    ``cls_token_id`` / ``sep_token_id`` are the ids packing uses (the tokenizer's cls/sep, else its bos/eos).
    """
    cls, sep = wrap_ids(tok, f"--tokenizer {name_or_path!r}")
    return {
        "name_or_path": name_or_path,
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "cls_token_id": cls,
        "sep_token_id": sep,
        "pad_token_id": tok.pad_token_id,
        "mask_token_id": tok.mask_token_id,
        "unk_token_id": tok.unk_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "all_special_ids": sorted(int(i) for i in tok.all_special_ids),
        "sha256": hashlib.sha256(backend_json(tok).encode()).hexdigest(),
    }


def backend_json(tok: Any) -> str:
    """The Rust tokenizer serialized as JSON (what worker processes rebuild it from)."""
    return tok.backend_tokenizer.to_str()


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (``vocab_size <= 65536``), else ``uint32``."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataPrepError(f"vocabulary of {vocab_size} ids does not fit uint32")


class Encoder:
    """Batched encoding into flat arrays; built from :func:`backend_json` so it can live in a worker process.

    ``encoder(texts) -> (ids, lengths)``: ``ids`` 1-D ``dtype`` array of all documents' tokens concatenated (no
    special tokens added), ``lengths`` int64 ``[len(texts)]`` tokens per document.
    """

    def __init__(self, tokenizer_json: str, dtype: str | np.dtype):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tokenizer_json)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = True
        # encode_batch_fast (tokenizers >= 0.21) gives the same ids without computing character offsets.
        self._encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        self.dtype = np.dtype(dtype)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = [e.ids for e in self._encode(texts, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return flat, lengths


_WORKER_ENCODER: Encoder | None = None


def init_worker(tokenizer_json: str, dtype: str, single_thread: bool) -> None:
    """Pool initializer: build the worker's :class:`Encoder`; one Rust thread per worker when ``single_thread``.

    Also starts a watchdog thread that ends the worker when its parent dies (a SIGKILLed ``prepare`` would
    otherwise leave workers blocked on the task queue forever).
    """
    global _WORKER_ENCODER
    if single_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = Encoder(tokenizer_json, dtype)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pool task: encode one batch with the worker's encoder (see :class:`Encoder`). Raises ``RuntimeError`` in a
    process where :func:`init_worker` did not run."""
    if _WORKER_ENCODER is None:
        raise RuntimeError("encode_in_worker: init_worker did not run in this process")
    return _WORKER_ENCODER(texts)
