"""The prepare pipeline: read documents -> tokenize (batched, parallel) -> split -> pack -> shards + manifest.

Data flow (one pass, streaming, memory flat in corpus size):

1. The main process reads documents from the sources in order and groups them into batches of about
   ``batch_chars`` characters.
2. ``num_proc`` spawned worker processes tokenize batches (one Rust ``encode_batch`` call per batch, one thread per
   worker); at most ``2 * num_proc + 2`` batches are in flight and results come back in submission order, so the
   output does not depend on ``num_proc`` or the batch size.
3. Each document gets its split from a hash of ``(seed, document index)`` (valid if below ``valid_fraction``), so
   the split is deterministic, streaming and by document. Documents with fewer than ``min_doc_tokens`` tokens are
   dropped and counted (reason ``empty`` or ``short``).
4. Each split is packed FULL-SENTENCES style (see :mod:`data_prep.shards`) into its own shards.
5. After every finished shard the exact position (documents consumed, partial shard lengths, packing carry, token
   counts, statistics) is saved atomically to ``prepare-state.npz``; a run started again with the same arguments
   continues from there and writes byte-identical output. ``token_counts.npy`` and ``manifest.json`` come last.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import shards
from data_prep.errors import DataPrepError
from data_prep.files import (
    DiskFullError,
    atomic_write_bytes,
    disk_full_message,
    holds_run,
    is_disk_full,
    leftover_temps,
    sha256_file,
)
from data_prep.shards import MANIFEST, SPLITS, TOKEN_COUNTS, ShardWriter
from data_prep.sources import Source, parse_source
from data_prep.tokenizer import (
    Encoder,
    backend_json,
    encode_in_worker,
    init_worker,
    load_tokenizer,
    token_dtype,
    tokenizer_record,
)

STATE = "prepare-state.npz"


def default_num_proc() -> int:
    """CPUs this process may run on (``os.sched_getaffinity`` where available)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass
class PrepareConfig:
    """Arguments of ``python -m data_prep prepare`` (see ``--help`` for each)."""

    sources: list[str]
    tokenizer: str
    max_seq_length: int
    output: str
    valid_fraction: float = 0.01
    shard_tokens: int = 1 << 25
    num_proc: int = dataclasses.field(default_factory=default_num_proc)
    seed: int = 0
    min_doc_tokens: int = 1
    errors: str = "strict"
    overwrite: bool = False
    batch_chars: int = 1 << 19
    progress: bool = True
    stats_json: str | None = None

    def validate(self) -> None:
        """Raises DataPrepError naming the bad option and value."""
        if not self.sources:
            raise DataPrepError("give at least one --source (e.g. --source embedded)")
        if self.max_seq_length < 3:
            raise DataPrepError(f"--max-seq-length {self.max_seq_length}: must be >= 3 (CLS + content + SEP)")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise DataPrepError(f"--valid-fraction {self.valid_fraction}: must be in [0, 1)")
        if self.shard_tokens < self.max_seq_length:
            raise DataPrepError(
                f"--shard-tokens {self.shard_tokens}: must be >= --max-seq-length {self.max_seq_length}"
            )
        if self.num_proc < 0:
            raise DataPrepError(f"--num-proc {self.num_proc}: must be >= 0 (0 = tokenize in the main process)")
        if self.min_doc_tokens < 1:
            raise DataPrepError(f"--min-doc-tokens {self.min_doc_tokens}: must be >= 1")
        if self.errors not in ("strict", "replace"):
            raise DataPrepError(f"--errors {self.errors!r}: use strict or replace")
        if self.batch_chars < 1:
            raise DataPrepError(f"--batch-chars {self.batch_chars}: must be >= 1")


def split_hash(seed: int, index: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) per document: splitmix64 (Steele et al. 2014) of ``seed * 2^32 + index``.

    ``index``: int64 ``[n]`` global document indices. Deterministic across machines and numpy versions.
    """
    with np.errstate(over="ignore"):
        z = (np.uint64(seed & 0xFFFFFFFF) << np.uint64(32)) + index.astype(np.uint64)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class Packer:
    """FULL-SENTENCES packing of one split (see :mod:`data_prep.shards`) into a :class:`ShardWriter`.

    ``add(ids, lengths)`` appends documents (``ids`` their tokens concatenated, ``lengths`` int64 ``[n]``);
    complete ``max_seq_length`` sequences are written at once, the remainder (< ``max_seq_length - 2`` tokens) is
    carried over. ``counts`` (int64 ``[vocab_size]`` or None) accumulates the ids written.
    """

    def __init__(self, writer: ShardWriter, cls: int, sep: int, max_seq_length: int, counts: np.ndarray | None):
        self.writer, self.cls, self.sep, self.length = writer, cls, sep, max_seq_length
        self.counts = counts
        self.carry = np.zeros(0, writer.dtype)
        self.num_documents = 0
        self.num_sequences = 0

    def _emit(self, rows: np.ndarray) -> None:
        self.writer.write(rows)
        self.num_sequences += 1 if rows.ndim == 1 else len(rows)
        if self.counts is not None:
            self.counts += np.bincount(rows.ravel(), minlength=len(self.counts))

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        stream = np.empty(len(self.carry) + len(ids) + len(lengths), self.writer.dtype)
        stream[: len(self.carry)] = self.carry
        body = stream[len(self.carry) :]
        seps = np.cumsum(lengths + 1) - 1
        is_text = np.ones(len(body), bool)
        is_text[seps] = False
        body[is_text] = ids
        body[seps] = self.sep
        self.num_documents += len(lengths)
        chunk = self.length - 2
        full = len(stream) // chunk
        if full:
            rows = np.empty((full, self.length), self.writer.dtype)
            rows[:, 0] = self.cls
            rows[:, -1] = self.sep
            rows[:, 1:-1] = stream[: full * chunk].reshape(full, chunk)
            self._emit(rows)
        self.carry = stream[full * chunk :].copy()

    def finish(self) -> None:
        """Write the last, shorter sequence (unless the carry is only a document separator)."""
        if np.any(self.carry != self.sep):
            self._emit(np.concatenate([[self.cls], self.carry, [self.sep]]).astype(self.writer.dtype))
        self.carry = self.carry[:0]


def _documents(sources: list[Source], errors: str) -> Iterator[tuple[int, str]]:
    for i, src in enumerate(sources):
        for text in src.documents(errors):
            yield i, text


def _batches(docs: Iterator[tuple[int, str]], batch_chars: int) -> Iterator[tuple[np.ndarray, list[str]]]:
    srcs: list[int] = []
    texts: list[str] = []
    size = 0
    for src, text in docs:
        text = text.strip()
        srcs.append(src)
        texts.append(text)
        size += len(text) + 1
        if size >= batch_chars:
            yield np.asarray(srcs, np.int64), texts
            srcs, texts, size = [], [], 0
    if texts:
        yield np.asarray(srcs, np.int64), texts


def _ordered_map(executor, batches, window: int):
    """``(batch, encode(batch.texts))`` in submission order with at most ``window`` batches in flight."""
    pending: collections.deque = collections.deque()
    try:
        for batch in batches:
            pending.append((batch, executor.submit(encode_in_worker, batch[1])))
            if len(pending) >= window:
                b, fut = pending.popleft()
                yield b, fut.result()
        while pending:
            b, fut = pending.popleft()
            yield b, fut.result()
    except BrokenProcessPool:
        raise DataPrepError(
            "a tokenizer worker process died (killed, or out of memory: lower --num-proc or "
            "--batch-chars); finished shards are kept: run the same command again to resume"
        ) from None


def _fingerprint(cfg: PrepareConfig, sources: list[Source], tok_record: dict) -> tuple[dict, str]:
    """The run's identity (what determines the output bytes) and its sha256. num_proc / batch size excluded."""
    config = {
        "format_version": shards.FORMAT_VERSION,
        "sources": [s.spec for s in sources],
        "tokenizer": cfg.tokenizer,
        "tokenizer_sha256": tok_record["sha256"],
        "max_seq_length": cfg.max_seq_length,
        "shard_tokens": cfg.shard_tokens,
        "seed": cfg.seed,
        "valid_fraction": cfg.valid_fraction,
        "min_doc_tokens": cfg.min_doc_tokens,
    }
    full = dict(config, inputs=[s.fingerprint() for s in sources])
    return config, hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()


def _our_files(out: Path) -> list[Path]:
    names = [MANIFEST, TOKEN_COUNTS, STATE]
    found = [out / n for n in names if (out / n).exists()]
    found += [p for p in out.iterdir() if shards.SHARD_FILE.match(p.name)]
    found += leftover_temps(out, (MANIFEST, TOKEN_COUNTS, STATE, *SPLITS))
    return found


def _remove_ours(out: Path) -> None:
    for p in _our_files(out):
        p.unlink(missing_ok=True)


def _save_state(out: Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    named: dict[str, Any] = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays}
    np.savez(buf, **named)
    atomic_write_bytes(out / STATE, buf.getvalue(), what="resume state")


def _load_state(out: Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    path = out / STATE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return json.loads(arrays.pop("meta").tobytes()), arrays
    except Exception as e:  # a state file is written atomically; anything unreadable is foreign
        raise DataPrepError(f"{path}: unreadable resume state ({e}); start again with --overwrite") from None


def _peak_rss_mib(pid: int | str = "self") -> float:
    """Peak resident memory (MiB) of a process: ``VmHWM`` on Linux (exact per process, unlike ``ru_maxrss``, which
    a spawned worker inherits from its parent across fork+exec), else ``ru_maxrss`` of this process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if pid != "self":
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole pipeline (see the module docstring) and return the manifest (also in ``OUTPUT/manifest.json``).

    If ``OUTPUT`` already holds this run's manifest, nothing is redone; if it holds an unfinished run with the same
    arguments (same sources, file sizes, tokenizer, packing and split settings), that run is resumed. Only files
    prepare writes (manifest, token counts, resume state, shards, their temporary files) are ever deleted.

    Raises:
        DataPrepError: bad options, bad sources (see :mod:`data_prep.sources`), a tokenizer that cannot be loaded
            or has no cls/sep (bos/eos) tokens, an output folder holding a different run (unless ``overwrite``) or
            a training run (always), an empty corpus. Nothing is left that looks like finished output: the manifest
            is written only at the very end, and an error before the first checkpoint removes the partial files.
        DiskFullError: the file system filled up (one line: the folder, the space free, what is kept).
    """
    t_start = time.perf_counter()
    cfg.validate()
    sources = [parse_source(s) for s in cfg.sources]
    tok = load_tokenizer(cfg.tokenizer)
    record = tokenizer_record(tok, cfg.tokenizer)
    dtype = token_dtype(record["vocab_size"])
    config, run_id = _fingerprint(cfg, sources, record)
    out = Path(cfg.output).expanduser()
    done = _finished_run(cfg, out, run_id, config)
    if done is not None:
        return done
    state = None if cfg.overwrite else _load_state(out) if out.is_dir() else None
    if state is not None and state[0].get("run_id") != run_id:
        raise DataPrepError(
            f"{out / STATE}: the folder holds an unfinished run of other arguments or inputs "
            f"({_differences(state[0].get('config'), config)}); run that command again to finish it, or pass "
            "--overwrite to start this one"
        )
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        _remove_ours(out)  # --overwrite, or partial files of a run killed before its first checkpoint
    else:
        for p in _our_files(out):  # an atomic write cut short by the kill
            if p.name.startswith("."):
                p.unlink(missing_ok=True)

    run = _Run(cfg, sources, tok, record, dtype, config, run_id, out, state)
    try:
        manifest = run.execute()
    except BaseException as e:
        run.abandon()
        if not (out / STATE).exists():
            _remove_ours(out)
            if created and not any(out.iterdir()):
                out.rmdir()
        full = _disk_full(out, e)
        if full is not None:
            raise full from e
        raise
    stats = run.stats(time.perf_counter() - t_start)
    run.print_summary(manifest, stats)
    if cfg.stats_json:
        atomic_write_bytes(cfg.stats_json, json.dumps(stats, indent=1).encode(), what="statistics")
    return manifest


def _finished_run(cfg: PrepareConfig, out: Path, run_id: str, config: dict) -> dict | None:
    """The manifest when ``out`` already holds this run's finished output (nothing to do), else None.

    Raises DataPrepError when ``out`` is a file, a training run directory (never written into), or holds a
    different run's finished output and ``overwrite`` is off."""
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"--output {out}: exists and is not a directory")
    if holds_run(out):
        raise DataPrepError(
            f"--output {out}: holds a training run (config.json with checkpoints/ or metrics.jsonl); give a new "
            "folder for the shards (refused even with --overwrite)"
        )
    if not (out / MANIFEST).exists():
        return None
    try:
        old = json.loads((out / MANIFEST).read_text())
    except ValueError:
        old = {}
    if old.get("config_sha256") == run_id and not cfg.overwrite:
        (out / STATE).unlink(missing_ok=True)  # killed after the manifest was written
        _say(f"{out}: already complete for these arguments (manifest.json); nothing to do")
        return old
    if not cfg.overwrite:
        raise DataPrepError(
            f"{out / MANIFEST}: the folder holds the output of another run "
            f"({_differences(old.get('config'), config)}); pass --overwrite to replace it, or choose another --output"
        )
    return None


# the fingerprint's keys as the command line names them
ARGUMENT_OF = {
    "sources": "--source",
    "tokenizer": "--tokenizer",
    "tokenizer_sha256": "--tokenizer (its files)",
    "max_seq_length": "--max-seq-length",
    "shard_tokens": "--shard-tokens",
    "seed": "--seed",
    "valid_fraction": "--valid-fraction",
    "min_doc_tokens": "--min-doc-tokens",
    "format_version": "the shard format version",
}


def _differences(old: Any, new: dict) -> str:
    """What differs between an earlier run's fingerprint ``old`` and this one's, by argument: ``--max-seq-length:
    128 there, 512 here``; the input files themselves when every argument is equal."""
    if not isinstance(old, dict):
        return "its arguments are not recorded"
    diffs = [
        f"{ARGUMENT_OF.get(k, k)}: {old.get(k)!r} there, {new.get(k)!r} here"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    return "; ".join(diffs) or "the same arguments, but the input files changed since (their sizes differ)"


def _disk_full(out: Path, e: BaseException) -> DiskFullError | None:
    """The one-line error of a prepare run stopped by a full disk (``e`` raised by a shard, index, state or manifest
    write), after its cleanup; None for any other error."""
    cause = e.__cause__ if isinstance(e, DiskFullError) and e.__cause__ else e
    if not (isinstance(e, DiskFullError) or is_disk_full(cause)):
        return None
    intact = (
        f"the finished shards and the resume state {STATE} are kept (no manifest.json, so nothing reads them as "
        "complete); free space and run the same command again to resume"
        if (out / STATE).exists()
        else "everything this run wrote was removed; free space and run the same command again"
    )
    return DiskFullError(disk_full_message("prepared shards", out, cause, intact=intact, todo=""))


class _Run:
    """One execution of the pipeline: the writers, packers, counters and the checkpoint logic."""

    def __init__(self, cfg, sources, tok, record, dtype, config, run_id, out, state):
        self.cfg, self.sources, self.record, self.dtype = cfg, sources, record, dtype
        self.config, self.run_id, self.out = config, run_id, out
        self.tokenizer_json = backend_json(tok)
        self.cls, self.sep = record["cls_token_id"], record["sep_token_id"]
        self.counts = np.zeros(record["vocab_size"], np.int64)
        self.writers = {s: ShardWriter(out, s, dtype, cfg.shard_tokens) for s in SPLITS}
        self.packers = {
            s: Packer(self.writers[s], self.cls, self.sep, cfg.max_seq_length, self.counts if s == "train" else None)
            for s in SPLITS
        }
        self.cursor = 0  # documents consumed (all effects of documents < cursor are in the state)
        self.per_source = [{"documents": 0, "tokens": 0} for _ in sources]
        self.dropped = {"empty": {"documents": 0, "tokens": 0}, "short": {"documents": 0, "tokens": 0}}
        self.special_in_text = 0
        self.resumed_from = 0
        self.new_tokens = 0  # document tokens tokenized by this process
        self.t_pipeline = 0.0
        self.cpu_main = self.cpu_workers = 0.0  # CPU seconds (user + system) of the pipeline
        self.worker_rss = 0.0
        if state is not None:
            self._restore(*state)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        meta = {
            "run_id": self.run_id,
            "config": self.config,
            "cursor": self.cursor,
            "per_source": self.per_source,
            "dropped": self.dropped,
            "special_in_text": self.special_in_text,
            "splits": {},
        }
        arrays = {"token_counts": self.counts}
        for s in SPLITS:
            self.writers[s].sync()
            wstate, offsets = self.writers[s].state()
            p = self.packers[s]
            meta["splits"][s] = {"writer": wstate, "num_documents": p.num_documents, "num_sequences": p.num_sequences}
            arrays[f"{s}_offsets"] = offsets
            arrays[f"{s}_carry"] = p.carry
        _save_state(self.out, meta, arrays)

    def _restore(self, meta: dict, arrays: dict) -> None:
        self.cursor = self.resumed_from = int(meta["cursor"])
        self.per_source = meta["per_source"]
        self.dropped = meta["dropped"]
        self.special_in_text = int(meta["special_in_text"])
        self.counts[:] = arrays["token_counts"]
        for s in SPLITS:
            m = meta["splits"][s]
            self.writers[s].resume(m["writer"], arrays[f"{s}_offsets"])
            p = self.packers[s]
            p.num_documents, p.num_sequences = int(m["num_documents"]), int(m["num_sequences"])
            p.carry = arrays[f"{s}_carry"].astype(self.dtype)
        _say(
            f"{self.out}: resuming an interrupted run at document {self.cursor:,} "
            f"({sum(len(w.done) for w in self.writers.values())} finished shards kept)"
        )

    def abandon(self) -> None:
        for w in self.writers.values():
            w.abandon()

    # -- the pipeline --------------------------------------------------------------------------------------------
    def _consume(self, srcs: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> None:
        cfg = self.cfg
        n = len(lengths)
        valid = split_hash(cfg.seed, np.arange(self.cursor, self.cursor + n, dtype=np.int64)) < cfg.valid_fraction
        keep = lengths >= cfg.min_doc_tokens
        empty = lengths == 0
        short = ~keep & ~empty
        self.dropped["empty"]["documents"] += int(empty.sum())
        self.dropped["short"]["documents"] += int(short.sum())
        self.dropped["short"]["tokens"] += int(lengths[short].sum())
        docs_per_src = np.bincount(srcs, minlength=len(self.sources))
        toks_per_src = np.bincount(srcs, weights=lengths, minlength=len(self.sources))
        for i in np.flatnonzero(docs_per_src):
            self.per_source[i]["documents"] += int(docs_per_src[i])
            self.per_source[i]["tokens"] += int(toks_per_src[i])
        if ids.size:
            self.special_in_text += int(np.count_nonzero((ids == self.cls) | (ids == self.sep)))
        for split, sel in (("train", keep & ~valid), ("valid", keep & valid)):
            if sel.all():
                self.packers[split].add(ids, lengths)
            elif sel.any():
                self.packers[split].add(ids[np.repeat(sel, lengths)], lengths[sel])
        self.cursor += n
        self.new_tokens += int(lengths.sum())

    def _encoded(self, batches) -> tuple[ProcessPoolExecutor | None, Iterator]:
        """``(executor or None, iterator of (batch, (ids, lengths)))``: batches tokenized in ``num_proc`` spawned
        workers, in submission order, or in this process when ``num_proc`` is 0."""
        if self.cfg.num_proc > 0:
            executor = ProcessPoolExecutor(
                self.cfg.num_proc,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=init_worker,
                initargs=(self.tokenizer_json, self.dtype.str, True),
            )
            return executor, _ordered_map(executor, batches, 2 * self.cfg.num_proc + 2)
        encoder = Encoder(self.tokenizer_json, self.dtype)
        return None, ((b, encoder(b[1])) for b in batches)

    def _rate(self, seconds: float) -> str:
        """The progress bar's token count (the summary's "document tokens") and rate."""
        return f"{self.new_tokens:,} document tokens, {self.new_tokens / max(seconds, 1e-9) / 1e3:.0f}k tokens/s"

    def execute(self) -> dict:
        """Tokenize, split, pack and write every document from the cursor on, checkpointing after each finished
        shard; then the token counts and the manifest. Returns the manifest."""
        from tqdm import tqdm

        cfg = self.cfg
        t0 = time.perf_counter()
        cpu0, child0 = _cpu_s(resource.RUSAGE_SELF), _cpu_s(resource.RUSAGE_CHILDREN)
        docs = _documents(self.sources, cfg.errors)
        for _ in range(self.cursor):  # resume: skip the documents already consumed (read, not tokenized)
            next(docs, None)
        batches = _batches(docs, cfg.batch_chars)
        tty = sys.stderr.isatty()
        counts = [src.num_documents() for src in self.sources]
        bar = tqdm(
            desc="prepare",
            unit=" docs",
            unit_scale=True,
            total=sum(c for c in counts if c is not None) if all(c is not None for c in counts) else None,
            initial=self.cursor,
            disable=not cfg.progress,
            mininterval=0.5 if tty else 30.0,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        executor, results = self._encoded(batches)
        last_post = 0.0
        try:
            for (srcs, _texts), (ids, lengths) in results:
                self._consume(srcs, ids, lengths)
                if any(w.finished_since_checkpoint for w in self.writers.values()):
                    self._checkpoint()
                bar.update(len(lengths))
                now = time.perf_counter()
                if now - last_post > 1.0:
                    last_post = now
                    bar.set_postfix_str(self._rate(now - t0), refresh=False)
            bar.set_postfix_str(self._rate(time.perf_counter() - t0))  # the final count, as the summary gives it
            if executor is not None:
                # The executor has no public list of its workers; _processes exists since Python 3.2.
                workers = list(getattr(executor, "_processes", {}) or {})
                self.worker_rss = max([_peak_rss_mib(pid) for pid in workers] + [0.0])
                executor.shutdown(wait=True)
                self.cpu_workers = _cpu_s(resource.RUSAGE_CHILDREN) - child0
        finally:
            bar.close()
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        manifest = self._finish()
        self.t_pipeline = time.perf_counter() - t0
        self.cpu_main = _cpu_s(resource.RUSAGE_SELF) - cpu0
        return manifest

    def _finish(self) -> dict:
        cfg = self.cfg
        for p in self.packers.values():
            p.finish()
        splits = {}
        for s in SPLITS:
            splits[s] = shards.split_summary(self.writers[s].close(), self.packers[s].num_documents)
        read = sum(x["documents"] for x in self.per_source)
        if splits["train"]["num_sequences"] == 0:
            _remove_ours(self.out)
            raise DataPrepError(
                f"the corpus is empty: {read} documents read from {[s.spec for s in self.sources]}, "
                f"{splits['valid']['num_documents']} went to the valid split, dropped: "
                f"{self.dropped['empty']['documents']} empty and {self.dropped['short']['documents']} shorter than "
                f"--min-doc-tokens {cfg.min_doc_tokens}; nothing was written"
            )
        if cfg.valid_fraction > 0 and splits["valid"]["num_sequences"] == 0:
            _say(
                f"warning: the valid split is empty ({read} documents, --valid-fraction {cfg.valid_fraction}); "
                "raise --valid-fraction for evaluation data"
            )
        shards.atomic_save_npy(self.out / TOKEN_COUNTS, self.counts)
        self.dropped["short"]["min_doc_tokens"] = cfg.min_doc_tokens
        manifest = {
            "format_version": shards.FORMAT_VERSION,
            "tokenizer": self.record,
            "max_seq_length": cfg.max_seq_length,
            "dtype": self.dtype.name,
            "packing": "full-sentences: the split's documents as one stream doc1 SEP doc2 SEP ..., cut into "
            "max_seq_length-2 tokens, each stored as CLS chunk SEP (cls/sep_token_id); no padding",
            "splits": splits,
            "token_counts": {
                "file": TOKEN_COUNTS,
                "bytes": (self.out / TOKEN_COUNTS).stat().st_size,
                "sha256": sha256_file(self.out / TOKEN_COUNTS),
            },
            "documents": {"read": read, "kept": splits["train"]["num_documents"] + splits["valid"]["num_documents"]},
            "dropped": self.dropped,
            "sources": [dict(s.describe(), **c) for s, c in zip(self.sources, self.per_source, strict=False)],
            "special_tokens_in_text": self.special_in_text,
            "seed": cfg.seed,
            "valid_fraction": cfg.valid_fraction,
            "split_method": "by document: splitmix64(seed << 32 | document index) / 2^64 < valid_fraction -> valid",
            "shard_tokens": cfg.shard_tokens,
            "min_doc_tokens": cfg.min_doc_tokens,
            "config": self.config,
            "config_sha256": self.run_id,
        }
        atomic_write_bytes(self.out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(), what="manifest")
        (self.out / STATE).unlink(missing_ok=True)
        return manifest

    # -- reporting -----------------------------------------------------------------------------------------------
    def stats(self, elapsed: float) -> dict:
        return {
            "output": str(self.out),
            "elapsed_s": round(elapsed, 3),
            "pipeline_s": round(self.t_pipeline, 3),
            "document_tokens": self.new_tokens,
            "tokens_per_s": round(self.new_tokens / max(self.t_pipeline, 1e-9), 1),
            "cpu_s_main": round(self.cpu_main, 3),
            "cpu_s_workers": round(self.cpu_workers, 3),
            "tokens_per_cpu_s": round(self.new_tokens / max(self.cpu_main + self.cpu_workers, 1e-9), 1),
            "num_proc": self.cfg.num_proc,
            "resumed_from_document": self.resumed_from,
            "peak_rss_main_mib": round(_peak_rss_mib(), 1),
            "peak_rss_worker_mib": round(self.worker_rss, 1),
        }

    def print_summary(self, manifest: dict, stats: dict) -> None:
        sp = manifest["splits"]
        d = manifest["dropped"]
        print(
            f"prepared {self.out} in {stats['elapsed_s']:.1f} s "
            f"({stats['tokens_per_s'] / 1e3:,.0f}k document tokens/s over {stats['pipeline_s']:.1f} s of "
            f"pipeline, {self.cfg.num_proc} worker processes)"
        )
        print(
            f"  documents: {manifest['documents']['read']:,} read ({stats['document_tokens']:,} document tokens), "
            f"{sp['train']['num_documents']:,} train, "
            f"{sp['valid']['num_documents']:,} valid, dropped {d['empty']['documents']:,} empty and "
            f"{d['short']['documents']:,} short ({d['short']['tokens']:,} tokens)"
        )
        for s in SPLITS:
            print(
                f"  {s}: {sp[s]['num_sequences']:,} sequences, {sp[s]['num_tokens']:,} tokens "
                f"({manifest['dtype']}, max_seq_length {manifest['max_seq_length']}) in {len(sp[s]['shards'])} "
                "shard(s)"
            )
        print(
            f"  CPU: main {stats['cpu_s_main']:.1f} s, workers {stats['cpu_s_workers']:.1f} s; peak RSS: main "
            f"{stats['peak_rss_main_mib']:.0f} MiB, largest worker {stats['peak_rss_worker_mib']:.0f} MiB"
        )
        if manifest["special_tokens_in_text"]:
            print(f"  note: {manifest['special_tokens_in_text']} cls/sep ids came from the text itself")
