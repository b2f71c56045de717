"""Teacher and students timed interleaved in PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime int8, with speed-ups.

On a shared machine the load changes from second to second, so timing one model after the other favours whichever
ran in a quiet moment. :func:`interleaved_speed` instead runs ``rounds`` rounds; in each round, for each batch size
and runtime, every model gets ``repeats`` timed calls (after ``warmup`` untimed ones in the first round), one model
right after the other. Per (model, runtime, batch) it reports the median over the rounds of the round's throughput,
the p50 / p95 latency over all timed calls, and two speed-ups, each the median over the rounds of that round's ratio
of throughputs: against the teacher in the same runtime and precision (int8 against int8), and against the PyTorch
fp32 teacher (what a user replaces). Inputs: random token ids, ``seq_len`` tokens, no padding; the same thread count
for every runtime (``torch.set_num_threads`` / ONNX Runtime's ``intra_op_num_threads``).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.deploy.common import cpu_info, input_names, load_torch_model
from pretrain.deploy.verify import OnnxRunner

Runner = Callable[[dict[str, np.ndarray]], object]
RUNTIMES = ("pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8")


def classifier_runners(model_dir: str | Path, onnx: Mapping[str, str | Path], threads: int) -> dict[str, Runner]:
    """``{runtime: callable(numpy batch)}`` for the classifier folder ``model_dir`` (``pytorch-fp32``, SDPA
    attention) and its ONNX files ``{"fp32": path, "int8": path}`` (``onnxruntime-fp32`` / ``-int8``)."""
    model = load_torch_model(model_dir, "classifier")
    names = input_names(model)

    def run_torch(batch: dict[str, np.ndarray]) -> object:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items() if k in names}).logits

    runners: dict[str, Runner] = {"pytorch-fp32": run_torch}
    for precision, path in onnx.items():
        runners[f"onnxruntime-{precision}"] = OnnxRunner(path, threads=threads)
    return runners


def _batch(batch: int, seq_len: int) -> dict[str, np.ndarray]:
    # ids below 100 exist in every vocabulary here; the speed of a dense encoder does not depend on which ids they are
    ids = np.random.default_rng(0).integers(5, 100, (batch, seq_len), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def _timed(fn: Runner, batch: dict[str, np.ndarray], calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t0)
    return times


def _rounds(
    models: Mapping[str, Mapping[str, Runner]], batches: Sequence[int], seq_len: int, rounds: int, repeats: dict, warmup
) -> dict[tuple[str, str, int], list[list[float]]]:
    """Every (model, runtime, batch)'s timed calls, one list per round, models interleaved within each round."""
    times: dict[tuple[str, str, int], list[list[float]]] = {}
    for r in range(rounds):
        for b in batches:
            inputs = _batch(b, seq_len)
            for runtime in RUNTIMES:
                for name, runners in models.items():
                    if runtime not in runners:
                        continue
                    if r == 0:
                        _timed(runners[runtime], inputs, warmup)
                    times.setdefault((name, runtime, b), []).append(_timed(runners[runtime], inputs, repeats[b]))
    return times


def interleaved_speed(
    models: Mapping[str, Mapping[str, Runner]],
    *,
    teacher: str = "teacher",
    threads: int = 2,
    batches: Sequence[int] = (1, 32),
    seq_len: int = 128,
    rounds: int = 3,
    repeats: dict[int, int] | None = None,
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """Time ``models`` (``{name: {runtime: runner}}``, e.g. from :func:`classifier_runners`; ``teacher`` names the
    reference) as the module docstring says. Returns one record per (model, runtime, batch): model, runtime, batch,
    seq_len, threads, rounds, repeats, p50_ms, p95_ms (ms per call), throughput_seq_s (sequences/s, median over
    rounds), speedup_same_runtime, speedup_vs_pytorch_teacher (None where the teacher lacks that runtime), cpu, isa,
    loadavg_1m (at the start). ``repeats``: timed calls per round by batch size (default 10 at batch 1, 3 above).
    torch's thread count is restored afterwards. Raises ``KeyError`` when ``teacher`` is not in ``models``."""
    if teacher not in models:
        raise KeyError(f"teacher {teacher!r} is not one of the models {list(models)}")
    reps = {b: (repeats or {}).get(b, 10 if b == 1 else 3) for b in batches}
    info, load = cpu_info(), os.getloadavg()[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = _rounds(models, batches, seq_len, rounds, reps, warmup)
    finally:
        torch.set_num_threads(before)
    thr = {k: [k[2] / statistics.mean(t) for t in v] for k, v in times.items()}  # sequences/s per round
    records = []
    for (name, runtime, b), per_round in times.items():
        flat = [x for t in per_round for x in t]

        def ratio(ref: tuple[str, str, int], key: tuple[str, str, int] = (name, runtime, b)) -> float | None:
            if ref not in thr:
                return None
            return float(statistics.median(s / t for s, t in zip(thr[key], thr[ref], strict=True)))

        records.append(
            {
                "model": name,
                "runtime": runtime,
                "batch": b,
                "seq_len": seq_len,
                "threads": threads,
                "rounds": rounds,
                "repeats": reps[b],
                "p50_ms": 1000 * float(np.percentile(flat, 50)),
                "p95_ms": 1000 * float(np.percentile(flat, 95)),
                "throughput_seq_s": float(statistics.median(thr[(name, runtime, b)])),
                "speedup_same_runtime": ratio((teacher, runtime, b)),
                "speedup_vs_pytorch_teacher": ratio((teacher, "pytorch-fp32", b)),
                "cpu": info["model"],
                "isa": " ".join(info["isa"]),
                "loadavg_1m": load,
            }
        )
    return records


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def speed_markdown(records: Sequence[dict[str, Any]]) -> str:
    """``records`` of :func:`interleaved_speed` as a markdown table (a line above with the CPU, ISA, threads, rounds
    and load)."""
    if not records:
        return ""
    r0 = records[0]
    head = (
        f"CPU: {r0['cpu']} ({r0['isa']}); {r0['threads']} threads for every runtime; sequence {r0['seq_len']}; "
        f"{r0['rounds']} interleaved rounds, medians; load average (1 min) at the start {r0['loadavg_1m']:.2f}\n\n"
    )
    rows = [
        "| model | runtime | batch | p50 ms | p95 ms | sequences/s | vs teacher, same runtime "
        "| vs PyTorch fp32 teacher |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = sorted(records, key=lambda r: (r["batch"], RUNTIMES.index(r["runtime"])))
    rows += [
        f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
        f"{r['throughput_seq_s']:.1f} | {_x(r['speedup_same_runtime'])} | {_x(r['speedup_vs_pytorch_teacher'])} |"
        for r in order
    ]
    return head + "\n".join(rows) + "\n"
