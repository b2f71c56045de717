"""CPU speed of a model in PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8, at the same thread count.

Each runtime gets ``warmup`` untimed calls, then ``repeats`` timed calls per batch size on random token ids of
``seq_len`` tokens (no padding). A record gives latency p50 / p95 in milliseconds per call and throughput in
sequences per second (``batch * repeats / total seconds``), with the CPU model, its int8-relevant ISA flags, the
thread count and the 1-minute load average at the start (the timing is only as good as the machine was idle).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from pretrain.deploy.common import OUTPUT_NAME, cpu_info, detect_kind, input_names, load_torch_model
from pretrain.deploy.verify import OnnxRunner


def _time(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _stats(times: list[float], batch: int) -> dict[str, float]:
    return {
        "p50_ms": 1000 * float(np.percentile(times, 50)),
        "p95_ms": 1000 * float(np.percentile(times, 95)),
        "throughput_seq_s": batch * len(times) / sum(times),
    }


def _per_batch(calls: int | Mapping[int, int], batch: int) -> int:
    return calls if isinstance(calls, int) else int(calls[batch])


def _inputs(batch: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(5, max(vocab, 6), (batch, seq_len), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def benchmark(
    model_dir: str | Path,
    onnx_paths: Mapping[str, str | Path],
    *,
    kind: str | None = None,
    threads: int = 2,
    batches: tuple[int, ...] = (1, 32),
    seq_len: int = 128,
    warmup: int | Mapping[int, int] = 3,
    repeats: int | Mapping[int, int] = 20,
) -> list[dict]:
    """Time ``pytorch-fp32`` (the folder's model) and each ``{runtime name: ONNX file}`` of ``onnx_paths`` (e.g.
    ``{"onnxruntime-fp32": ..., "onnxruntime-int8": ...}``) at each batch size of ``batches`` with ``seq_len`` tokens,
    ``threads`` intra-op threads for every runtime (``torch.set_num_threads`` / ``intra_op_num_threads``).
    ``warmup`` / ``repeats``: untimed / timed calls, one number for every batch size or ``{batch: calls}``.

    Returns one dict per (runtime, batch): runtime, batch, seq_len, threads, repeats, p50_ms, p95_ms,
    throughput_seq_s, cpu, isa, loadavg_1m. torch's thread count is restored afterwards.
    """
    kind = detect_kind(model_dir, kind)
    model = load_torch_model(model_dir, kind)
    vocab = int(getattr(model.config, "vocab_size", 100))
    info, load = cpu_info(), os.getloadavg()[0]
    runners: dict[str, Callable[[dict[str, np.ndarray]], object]] = {}
    names = input_names(model)

    def run_torch(b: dict[str, np.ndarray]) -> object:
        feed = {k: torch.from_numpy(v) for k, v in b.items() if k in names}
        with torch.inference_mode():
            return model(**feed, return_dict=True)[OUTPUT_NAME[kind]]

    runners["pytorch-fp32"] = run_torch
    for name, path in onnx_paths.items():
        runners[name] = OnnxRunner(path, threads=threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    records = []
    try:
        for name, run in runners.items():
            for batch in batches:
                inputs = _inputs(batch, seq_len, vocab)
                n_warm, n_rep = _per_batch(warmup, batch), _per_batch(repeats, batch)
                times = _time(functools.partial(run, inputs), n_warm, n_rep)
                base = {"runtime": name, "batch": batch, "seq_len": seq_len, "threads": threads, "repeats": n_rep}
                records.append({**base, **_stats(times, batch), "cpu": info["model"], "isa": " ".join(info["isa"])})
                records[-1]["loadavg_1m"] = load
    finally:
        torch.set_num_threads(before)
    return records


def markdown_table(records: list[dict]) -> str:
    """``records`` of :func:`benchmark` as a markdown table, with the CPU, ISA, threads and load in a line above."""
    if not records:
        return ""
    r0 = records[0]
    calls = ", ".join(sorted({f"batch {r['batch']}: {r['repeats']}" for r in records}))
    head = (
        f"CPU: {r0['cpu']} ({r0['isa']}); {r0['threads']} threads; sequence {r0['seq_len']}; "
        f"timed calls after warm-up: {calls}; "
        f"load average (1 min) {r0['loadavg_1m']:.2f}\n\n"
    )
    rows = ["| runtime | batch | p50 ms | p95 ms | sequences/s |", "| --- | ---: | ---: | ---: | ---: |"]
    rows += [
        f"| {r['runtime']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['throughput_seq_s']:.1f} |"
        for r in records
    ]
    return head + "\n".join(rows) + "\n"
