"""The shard format: writer, memory-mapped reader and verification.

A prepared directory holds, per split (``train``, ``valid``), shards ``{split}-{k:05d}.bin`` (the split's sequences
concatenated: raw little-endian ``uint16`` token ids when the vocabulary has at most 65,536 ids, else ``uint32``)
each with an index ``{split}-{k:05d}.idx.npy`` (int64 ``[num_sequences + 1]`` offsets in tokens into the ``.bin``;
sequence ``i`` is ``tokens[idx[i]:idx[i+1]]``); ``token_counts.npy`` (int64 ``[vocab_size]``, occurrences of every
id in the train split's shards, special tokens included, so it sums to the split's ``num_tokens``); and
``manifest.json``, written last. A shard is written as ``*.partial`` and renamed when complete; the manifest names
every shard with its size and sha256, so ``verify`` can check them.

Sequences are packed RoBERTa FULL-SENTENCES style (Liu et al. 2019, "RoBERTa", section 4.2): the split's documents
form one stream ``doc1 SEP doc2 SEP ...`` cut into chunks of ``max_seq_length - 2`` tokens, each stored as
``CLS chunk SEP`` (BERT ``[CLS] ... [SEP]``, RoBERTa ``<s> ... </s>``); every sequence has exactly
``max_seq_length`` tokens except possibly the split's last one. No padding is stored.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.files import atomic_path, replace_durably, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_COUNTS = "token_counts.npy"
PARTIAL = ".partial"
SPLITS = ("train", "valid")


SHARD_FILE = re.compile(r"^(train|valid)-(\d{5})\.(bin|idx\.npy|bin\.partial)$")  # every file a writer creates


def split_summary(records: list[dict], num_documents: int) -> dict:
    """A split's manifest entry: sequences and tokens summed over its shard records (:meth:`ShardWriter.close`), the
    documents packed into it, and the records."""
    return {
        "num_sequences": sum(r["num_sequences"] for r in records),
        "num_tokens": sum(r["num_tokens"] for r in records),
        "num_documents": num_documents,
        "shards": records,
    }


def shard_files(split: str, k: int) -> tuple[str, str]:
    """File names of shard ``k`` of ``split``: ``(tokens, index)``."""
    return f"{split}-{k:05d}.bin", f"{split}-{k:05d}.idx.npy"


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically (temporary name, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def load_manifest(directory: str | os.PathLike) -> dict:
    """Read ``DIR/manifest.json``.

    Raises:
        DataPrepError: no manifest (the directory is not a finished ``prepare`` output) or unreadable JSON.
    """
    path = Path(directory) / MANIFEST
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataPrepError(
            f"{path}: not found; {directory} is not a finished `python -m data_prep prepare` "
            "output (run prepare, or finish an interrupted run by starting it again)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataPrepError(f"{path}: cannot read ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataPrepError(
            f"{path}: format_version {manifest.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}; prepare the data again"
        )
    return manifest


def load_token_counts(directory: str | os.PathLike) -> np.ndarray:
    """int64 ``[vocab_size]``: how often each id occurs in the train split (special tokens included)."""
    path = Path(directory) / TOKEN_COUNTS
    try:
        counts = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataPrepError(f"{path}: not found; prepare the data with `python -m data_prep prepare`") from None
    return counts.astype(np.int64, copy=False)


class _BackgroundHasher:
    """One daemon thread per process that hashes files (:func:`data_prep.files.sha256_file`) in the order asked,
    each version of a file (path, size, mtime) once; ``hashlib`` and file reads release the GIL, so training goes
    on meanwhile. A daemon thread: a process that ends does not wait for the queue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[Path, Future[str]]] = queue.Queue()
        self._results: dict[tuple[str, int, int], Future[str]] = {}
        self._thread: threading.Thread | None = None

    def submit(self, path: Path) -> Future[str]:
        """A future of ``path``'s hex sha256 (``OSError`` when unreadable)."""
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key not in self._results:
                self._results[key] = Future()
                self._queue.put((path, self._results[key]))
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="shard-sha256", daemon=True)
                    self._thread.start()
            return self._results[key]

    def _run(self) -> None:
        while True:
            path, fut = self._queue.get()
            try:
                fut.set_result(sha256_file(path))
            except OSError as e:
                fut.set_exception(e)


HASHER = _BackgroundHasher()


class ShardedTokens:
    """Random access to one split of a prepared directory, memory-mapped (nothing is read until asked for).

    ``len(ds)`` sequences; ``ds[i]`` -> 1-D ``np.ndarray`` (``manifest["dtype"]``: uint16 or uint32) of sequence
    ``i``'s token ids, special tokens included, no padding (a copy, safe to modify); ``ds.lengths`` -> int64
    ``[len(ds)]`` tokens per sequence (from the index files only); ``ds.manifest`` -> the manifest dict;
    ``ds.documents()`` -> each document's token ids (no special tokens) in order. Picklable (for DataLoader
    workers): the memory maps are reopened lazily in the receiving process.

    Raises:
        DataPrepError: the directory has no manifest, the split does not exist, or a shard/index file is missing
            or has the wrong size (run ``python -m data_prep verify DIR``).
    """

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        self.directory = Path(directory)
        self.split = split
        self.manifest = load_manifest(directory)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataPrepError(f"{self.directory / MANIFEST}: no split {split!r} (splits: {sorted(splits)})")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.sep_token_id = int(self.manifest["tokenizer"]["sep_token_id"])
        self._shards = splits[split]["shards"]
        counts = [int(s["num_sequences"]) for s in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        for s in self._shards:
            path = self.directory / s["file"]
            if not path.is_file() or path.stat().st_size != s["bytes"]:
                raise DataPrepError(
                    f"{path}: missing or not {s['bytes']} bytes as the manifest says; "
                    f"run `python -m data_prep verify {self.directory}`"
                )
        self._index: list[np.ndarray | None] = [None] * len(self._shards)
        self._tokens: list[np.ndarray | None] = [None] * len(self._shards)
        self._lengths: np.ndarray | None = None
        self._hashes: list[tuple[Path, str, Future[str]]] = []

    def start_verify(self) -> None:
        """Hash this split's shard and index files in the background (:data:`HASHER`; each file once per process),
        to compare with the manifest's sha256 in :meth:`verify_problem`. Returns at once."""
        self._hashes = [
            (self.directory / s[name], s[digest], HASHER.submit(self.directory / s[name]))
            for s in self._shards
            for name, digest in (("file", "sha256"), ("index_file", "index_sha256"))
        ]

    def verify_problem(self) -> str | None:
        """The first file whose finished background hash (:meth:`start_verify`) differs from the manifest, as one
        line naming it, the expected and actual sha256 and what to run; None while none differs (hashes still
        running are not waited for). Cheap: finished files are checked once."""
        problem, keep = None, []
        for path, expected, fut in self._hashes:
            if problem is not None or not fut.done():
                keep.append((path, expected, fut))
                continue
            try:
                actual = fut.result()
            except OSError as e:
                actual = f"unreadable ({e})"
            if actual != expected:
                keep.append((path, expected, fut))  # reported again at the next call
                problem = (
                    f"{path}: sha256 {actual} does not match the manifest's {expected} (the file changed since "
                    f"prepare wrote it); run `python -m data_prep verify {self.directory}`, then prepare the data "
                    "again (python -m data_prep prepare ... --overwrite)"
                )
        self._hashes = keep
        return problem

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _idx(self, s: int) -> np.ndarray:
        cached = self._index[s]
        if cached is None:
            path = self.directory / self._shards[s]["index_file"]
            try:
                idx = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataPrepError(
                    f"{path}: cannot read the index ({e}); run `python -m data_prep verify {self.directory}`"
                ) from None
            if idx.shape != (self._shards[s]["num_sequences"] + 1,):
                raise DataPrepError(
                    f"{path}: index shape {idx.shape} does not match the manifest's "
                    f"{self._shards[s]['num_sequences']} sequences"
                )
            self._index[s] = cached = idx
        return cached

    def _tok(self, s: int) -> np.ndarray:
        tokens = self._tokens[s]
        if tokens is None:
            tokens = self._tokens[s] = np.memmap(self.directory / self._shards[s]["file"], dtype=self.dtype, mode="r")
        return tokens

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences ({self.directory}, {self.split})")
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[s])
        idx = self._idx(s)
        return np.array(self._tok(s)[int(idx[j]) : int(idx[j + 1])])

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``[len(self)]``: tokens per sequence (special tokens included), read from the index files."""
        if self._lengths is None:
            parts = [np.diff(np.asarray(self._idx(s))) for s in range(len(self._shards))]
            self._lengths = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        return self._lengths

    def documents(self, block_sequences: int = 4096) -> Iterator[np.ndarray]:
        """Yield every document's token ids (no special tokens), in order, reading ``block_sequences`` at a time.

        Documents are recovered by dropping each sequence's first and last token (CLS/SEP) and splitting the
        remaining stream at the separator (``sep_token_id``) that follows every document.
        """
        sep = self.sep_token_id
        carry: list[np.ndarray] = []
        for s in range(len(self._shards)):
            idx = np.asarray(self._idx(s))
            tokens = self._tok(s)
            for j0 in range(0, len(idx) - 1, block_sequences):
                j1 = min(j0 + block_sequences, len(idx) - 1)
                base = int(idx[j0])
                block = np.array(tokens[base : int(idx[j1])])
                keep = np.ones(len(block), dtype=bool)
                keep[idx[j0:j1] - base] = False  # CLS
                keep[idx[j0 + 1 : j1 + 1] - base - 1] = False  # wrapper SEP
                content = block[keep]
                cuts = np.flatnonzero(content == sep)
                start = 0
                for c in cuts.tolist():
                    carry.append(content[start:c])
                    yield np.concatenate(carry) if len(carry) > 1 else carry[0].copy()
                    carry = []
                    start = c + 1
                if start < len(content):
                    carry.append(content[start:])
        if carry:
            yield np.concatenate(carry)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_index"] = [None] * len(self._shards)
        state["_tokens"] = [None] * len(self._shards)
        state["_hashes"] = []
        return state


class ShardWriter:
    """Writes one split's sequences to shards of about ``shard_tokens`` tokens, resumably.

    The current shard is appended to ``{split}-{k:05d}.bin.partial``; when it reaches ``shard_tokens`` tokens (at a
    sequence boundary) it is fsynced, hashed, its index written, and both renamed to their final names. The
    in-progress position is captured by :meth:`state` and restored by :meth:`resume` (which truncates the partial
    file to the recorded length), so a run killed at any moment continues byte-identically.
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory = Path(directory)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.done: list[dict] = []  # finished shards' manifest records
        self.finished_since_checkpoint = False
        self._file: BinaryIO | None = None
        self._tokens = 0  # tokens in the current shard
        self._offsets: list[np.ndarray] = [np.zeros(1, np.int64)]  # current shard's offsets, in pieces

    @property
    def k(self) -> int:
        return len(self.done)

    def _paths(self, k: int | None = None) -> tuple[Path, Path]:
        tokens, index = shard_files(self.split, self.k if k is None else k)
        return self.directory / tokens, self.directory / index

    def _open(self):
        if self._file is None:
            path = self._paths()[0]
            self._file = path.with_name(path.name + PARTIAL).open("ab")
        return self._file

    def write(self, rows: np.ndarray) -> None:
        """Append sequences: ``rows`` is ``[n, L]`` (n sequences of L tokens) or a 1-D array (one sequence)."""
        rows = np.asarray(rows, dtype=self.dtype)
        if rows.ndim == 1:
            rows = rows[None, :]
        n, length = rows.shape
        i = 0
        while i < n:
            room = -(-(self.shard_tokens - self._tokens) // length)  # rows until the shard is full (ceil)
            take = min(n - i, max(room, 1))
            chunk = rows[i : i + take]
            self._open().write(chunk.tobytes())
            self._offsets.append(self._tokens + length * np.arange(1, take + 1, dtype=np.int64))
            self._tokens += take * length
            i += take
            if self._tokens >= self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self) -> None:
        f = self._open()
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        tokens_path, index_path = self._paths()
        partial = tokens_path.with_name(tokens_path.name + PARTIAL)
        offsets = np.concatenate(self._offsets)
        atomic_save_npy(index_path, offsets)
        record = {
            "file": tokens_path.name,
            "num_sequences": len(offsets) - 1,
            "num_tokens": int(offsets[-1]),
            "bytes": int(offsets[-1]) * self.dtype.itemsize,
            "sha256": sha256_file(partial),
            "index_file": index_path.name,
            "index_bytes": index_path.stat().st_size,
            "index_sha256": sha256_file(index_path),
        }
        replace_durably(partial, tokens_path)
        self.done.append(record)
        self.finished_since_checkpoint = True
        self._tokens = 0
        self._offsets = [np.zeros(1, np.int64)]

    def close(self) -> list[dict]:
        """Finish the last (possibly smaller) shard; returns all shards' records."""
        if self._tokens:
            self._finish_shard()
        return self.done

    def abandon(self) -> None:
        """Close the partial file without finishing it (on errors)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def sync(self) -> None:
        """Flush and fsync the partial file so a checkpoint may refer to its current length."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def state(self) -> tuple[dict, np.ndarray]:
        """``(json-able dict, offsets of the current shard)`` describing the exact write position."""
        self.finished_since_checkpoint = False
        return {"done": [dict(r) for r in self.done], "tokens": self._tokens}, np.concatenate(self._offsets)

    def resume(self, state: dict, offsets: np.ndarray) -> None:
        """Continue from a :meth:`state`: the partial file is cut back to the recorded length.

        If the process died between renaming a finished shard and recording it, the renamed file is turned back
        into the partial one (its first bytes are exactly the recorded ones).

        Raises:
            DataPrepError: the files on disk are shorter than the state says (the directory was modified).
        """
        self.done = list(state["done"])
        self._tokens = int(state["tokens"])
        self._offsets = [np.asarray(offsets, dtype=np.int64)]
        tokens_path, index_path = self._paths()
        partial = tokens_path.with_name(tokens_path.name + PARTIAL)
        want = self._tokens * self.dtype.itemsize
        if not partial.exists() and tokens_path.exists():
            os.replace(tokens_path, partial)
        if index_path.exists():
            index_path.unlink()
        if want and (not partial.exists() or partial.stat().st_size < want):
            raise DataPrepError(
                f"{partial}: expected at least {want} bytes to resume from, found "
                f"{partial.stat().st_size if partial.exists() else 'no file'}; the output folder "
                "was modified: start again with --overwrite"
            )
        if partial.exists():
            with open(partial, "r+b") as f:
                f.truncate(want)
        for path in self.directory.glob(f"{self.split}-*"):  # stale files of later shards
            m = SHARD_FILE.match(path.name)
            if m and m.group(1) == self.split and int(m.group(2)) > self.k:
                path.unlink()


def _check_index(path: Path, record: dict) -> bool:
    """Whether the index file ``path`` has the offsets a shard of ``record`` (manifest entry) needs: shape
    ``[num_sequences + 1]``, 0 first, ``num_tokens`` last, strictly increasing."""
    idx = np.load(path, allow_pickle=False)
    return not (
        idx.shape != (record["num_sequences"] + 1,)
        or idx[0] != 0
        or idx[-1] != record["num_tokens"]
        or np.any(np.diff(idx) <= 0)
    )


def _check_token_counts(directory: Path, manifest: dict) -> str | None:
    """A problem line when ``token_counts.npy`` does not have ``vocab_size`` entries summing to the train tokens."""
    tc = manifest["token_counts"]
    counts = np.load(directory / tc["file"], allow_pickle=False)
    train_tokens = manifest["splits"].get("train", {}).get("num_tokens", 0)
    if counts.shape != (manifest["tokenizer"]["vocab_size"],) or int(counts.sum()) != train_tokens:
        return (
            f"{directory / tc['file']}: shape {counts.shape} / sum {int(counts.sum())} does not "
            f"match vocab_size {manifest['tokenizer']['vocab_size']} / train tokens {train_tokens}"
        )
    return None


def verify(directory: str | os.PathLike) -> tuple[list[str], dict]:
    """Check every shard's and index's size and sha256 (and the token counts) against the manifest.

    Returns ``(problems, totals)``: ``problems`` lists one line per bad file naming it (empty = all good);
    ``totals`` has ``shards``, ``sequences``, ``tokens``, ``bytes`` checked.

    Raises:
        DataPrepError: no readable manifest.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    problems: list[str] = []
    totals = {"shards": 0, "sequences": 0, "tokens": 0, "bytes": 0}

    def check(name: str, size: int, digest: str) -> bool:
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            return False
        if path.stat().st_size != size:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {size}")
            return False
        got = sha256_file(path)
        if got != digest:
            problems.append(f"{path}: sha256 {got} does not match the manifest's {digest}")
            return False
        totals["bytes"] += size
        return True

    for split, entry in manifest["splits"].items():
        seqs = toks = 0
        for s in entry["shards"]:
            ok = check(s["file"], s["bytes"], s["sha256"])
            ok = check(s["index_file"], s["index_bytes"], s["index_sha256"]) and ok
            if s["bytes"] != s["num_tokens"] * itemsize:
                problems.append(
                    f"{directory / s['file']}: manifest says {s['num_tokens']} tokens but {s['bytes']} bytes"
                )
            elif ok and not _check_index(directory / s["index_file"], s):
                problems.append(f"{directory / s['index_file']}: offsets inconsistent with the manifest")
            totals["shards"] += 1
            seqs += s["num_sequences"]
            toks += s["num_tokens"]
        if (seqs, toks) != (entry["num_sequences"], entry["num_tokens"]):
            problems.append(
                f"{directory / MANIFEST}: split {split!r} totals ({entry['num_sequences']} sequences, "
                f"{entry['num_tokens']} tokens) differ from its shards' ({seqs}, {toks})"
            )
        totals["sequences"] += seqs
        totals["tokens"] += toks
    tc = manifest.get("token_counts")
    if tc and check(tc["file"], tc["bytes"], tc["sha256"]) and (problem := _check_token_counts(directory, manifest)):
        problems.append(problem)
    return problems, totals
