"""``python -m data_prep bench``: prepare's end-to-end throughput against the tokenizer's own ceilings.

On one corpus built from the embedded text (repeated until it holds at least ``min_tokens`` tokens), in one run:

* ``prepare``: the real command in a subprocess (``jsonl:`` source: reading, JSON parsing, tokenizing in
  ``num_proc`` workers, splitting, packing, writing and hashing shards included); its pipeline rate (documents'
  tokens / seconds from the first read to the manifest) and its command rate (the same tokens / the command's
  wall time, interpreter start, ``import transformers`` and tokenizer loading included);
* the batched-tokenizer ceiling: one ``tokenizer(all_documents, add_special_tokens=False)`` call (the Rust
  backend parallel over all cores), no reading or writing; run before and after prepare, the mean time is used;
* the per-line rate: one ``tokenizer.encode(line, add_special_tokens=False)`` call per line;
* for reference, the Rust backend alone: one ``encode_batch_fast`` call over all documents (all cores, no
  Python-side conversion), the hardest ceiling;
* peak RSS of prepare's main process and largest worker.

Timings on a shared machine are noisy: compare the ratios measured in the same run, and repeat. The rates per CPU
second (prepare: main process from the first read to the manifest + all workers; batched: all threads of the call)
are less sensitive to other jobs than wall-clock rates: on an idle machine with N cores, prepare's wall-clock rate
approaches N times its per-CPU-second rate.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _prepare_once(docs: list[str], tokenizer: str, max_seq_length: int, num_proc: int, workdir: str | None):
    """Write ``docs`` as JSON Lines and run ``python -m data_prep prepare`` on them in a subprocess (in ``workdir`` or a
    temporary folder); returns ``(prepare's --stats-json dict, the command's wall seconds)``."""
    with tempfile.TemporaryDirectory(prefix="data_prep_bench-") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / "corpus.jsonl"
        with open(corpus, "w", encoding="utf-8") as f:  # bench input, not project output (deleted with the folder)
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        stats_path = work / "prepare_stats.json"
        cmd = [sys.executable, "-m", "data_prep", "prepare", "--source", f"jsonl:{corpus}", "--tokenizer", tokenizer]
        cmd += ["--max-seq-length", str(max_seq_length), "--output", str(work / "shards"), "--num-proc", str(num_proc)]
        cmd += ["--overwrite", "--no-progress", "--stats-json", str(stats_path)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        command_s = time.perf_counter() - t
        return json.loads(stats_path.read_text()), command_s


def _ceilings(tok, docs: list[str]) -> dict[str, float]:
    """The Rust backend's ``encode_batch_fast`` over all documents and ``tokenizer.encode`` per line: tokens and
    seconds of each (``rust_tokens``, ``rust_s``, ``per_line_tokens``, ``per_line_s``)."""
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    t = time.perf_counter()
    rust_tokens = sum(len(e.ids) for e in backend.encode_batch_fast(docs, add_special_tokens=False))
    rust_s = time.perf_counter() - t
    lines = [line for d in docs for line in d.split("\n") if line.strip()]
    t = time.perf_counter()
    per_line_tokens = sum(len(tok.encode(line, add_special_tokens=False)) for line in lines)
    return {
        "rust_tokens": rust_tokens,
        "rust_s": rust_s,
        "per_line_tokens": per_line_tokens,
        "per_line_s": time.perf_counter() - t,
    }


def _corpus(tok, min_tokens: int) -> tuple[list[str], int, float]:
    """The embedded documents (stripped, non-empty) repeated until they hold ``min_tokens`` tokens: ``(documents,
    repeats, seconds of the first, warm-up tokenization)``."""
    from data_prep.sources import embedded_documents

    base = [d.strip() for d in embedded_documents()]
    base = [d for d in base if d]
    t = time.perf_counter()
    base_tokens = sum(map(len, tok(base, add_special_tokens=False)["input_ids"]))
    warmup_s = time.perf_counter() - t
    repeats = max(1, math.ceil(min_tokens / base_tokens))
    return base * repeats, repeats, warmup_s


def run_bench(
    tokenizer: str = "embedded:minilm-l6",
    num_proc: int | None = None,
    min_tokens: int = 8_000_000,
    max_seq_length: int = 512,
    workdir: str | None = None,
) -> dict:
    """Run the benchmark (see the module docstring); returns the numbers as a dict (rates in tokens/s)."""
    from data_prep.prepare import default_num_proc
    from data_prep.tokenizer import load_tokenizer

    num_proc = default_num_proc() if num_proc is None else num_proc
    tok = load_tokenizer(tokenizer)
    docs, repeats, warmup_s = _corpus(tok, min_tokens)

    def batched() -> tuple[int, float, float]:
        t, c = time.perf_counter(), _cpu_s()
        n = sum(map(len, tok(docs, add_special_tokens=False)["input_ids"]))
        return n, time.perf_counter() - t, _cpu_s() - c

    load_before = os.getloadavg()[0]
    batched_tokens, batched_s1, batched_cpu1 = batched()  # before and after prepare: the load drifts
    stats, command_s = _prepare_once(docs, tokenizer, max_seq_length, num_proc, workdir)
    _, batched_s2, batched_cpu2 = batched()
    c = _ceilings(tok, docs)
    prepare_rate = stats["tokens_per_s"]
    batched_rate = batched_tokens / ((batched_s1 + batched_s2) / 2)
    batched_cpu_rate = batched_tokens / ((batched_cpu1 + batched_cpu2) / 2)
    return {
        "tokenizer": tokenizer,
        "documents": len(docs),
        "repeats_of_embedded_text": repeats,
        "corpus_tokens": batched_tokens,
        "max_seq_length": max_seq_length,
        "num_proc": num_proc,
        "cpus": os.cpu_count(),
        "prepare_tokens_per_s": round(prepare_rate),
        "prepare_pipeline_s": stats["pipeline_s"],
        "prepare_command_s": round(command_s, 2),
        "prepare_command_tokens_per_s": round(stats["document_tokens"] / command_s),
        "batched_tokenizer_tokens_per_s": round(batched_rate),
        "batched_tokenizer_before_after_tokens_per_s": [
            round(batched_tokens / batched_s1),
            round(batched_tokens / batched_s2),
        ],
        "per_line_encode_tokens_per_s": round(c["per_line_tokens"] / c["per_line_s"]),
        "rust_encode_batch_fast_tokens_per_s": round(c["rust_tokens"] / c["rust_s"]),
        "ratio_prepare_to_batched": round(prepare_rate / batched_rate, 3),
        "ratio_command_to_batched": round(stats["document_tokens"] / command_s / batched_rate, 3),
        "prepare_tokens_per_cpu_s": round(stats["tokens_per_cpu_s"]),
        "batched_tokenizer_tokens_per_cpu_s": round(batched_cpu_rate),
        "ratio_per_cpu_s_prepare_to_batched": round(stats["tokens_per_cpu_s"] / batched_cpu_rate, 3),
        "prepare_cpu_s_main_workers": [stats["cpu_s_main"], stats["cpu_s_workers"]],
        "peak_rss_main_mib": stats["peak_rss_main_mib"],
        "peak_rss_worker_mib": stats["peak_rss_worker_mib"],
        "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "warmup_s": round(warmup_s, 2),
    }
