"""The deployment section's speed rows and plot: teacher and student in each runtime, with their speed-ups.

Input: the records of :func:`pretrain.deploy.speed.benchmark` for the teacher and for the student (runtimes
``pytorch-fp32``, ``onnxruntime-fp32``, ``onnxruntime-int8``; batch sizes 1 and 32). A student row's speed-ups are its
throughput over the teacher's in the same runtime and batch size, and over the PyTorch fp32 teacher's at that batch
size (what a user replaces). The markdown of these rows is rendered by ``pretrain.report`` from report.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretrain.report import save_figure

RUNTIMES = ("pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8")


def speed_rows(teacher: list[dict], student: list[dict]) -> list[dict[str, Any]]:
    """One row per (model, runtime, batch), teacher rows first: model, runtime, batch, seq_len, threads, repeats,
    p50_ms, p95_ms, throughput_seq_s (sequences / s) and, for student rows, ``speedup_same_runtime`` and
    ``speedup_vs_pytorch_teacher`` (throughput ratios; None where the teacher lacks that row)."""
    key = {(r["runtime"], r["batch"]): r["throughput_seq_s"] for r in teacher}
    fields = ("runtime", "batch", "seq_len", "threads", "repeats", "p50_ms", "p95_ms", "throughput_seq_s")
    rows: list[dict[str, Any]] = [{"model": "teacher", **{f: r[f] for f in fields}} for r in teacher]
    for r in student:
        same, base = key.get((r["runtime"], r["batch"])), key.get(("pytorch-fp32", r["batch"]))
        rows.append(
            {
                "model": "student",
                **{f: r[f] for f in fields},
                "speedup_same_runtime": r["throughput_seq_s"] / same if same else None,
                "speedup_vs_pytorch_teacher": r["throughput_seq_s"] / base if base else None,
            }
        )
    return rows


def speed_figure(rows: list[dict[str, Any]]) -> Any:
    """A matplotlib Figure: one panel per batch size, throughput (sequences / s, log scale) of teacher and student
    in each runtime, each student bar labelled with its speed-up over the teacher in the same runtime. None without
    rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    if not batches:
        return None
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    width = 0.38
    for ax, batch in zip(axes[0], batches, strict=False):
        for j, model in enumerate(("teacher", "student")):
            got = {r["runtime"]: r for r in rows if r["model"] == model and r["batch"] == batch}
            xs = [i + (j - 0.5) * width for i, rt in enumerate(RUNTIMES) if rt in got]
            ys = [got[rt]["throughput_seq_s"] for rt in RUNTIMES if rt in got]
            bars = ax.bar(xs, ys, width, label=model)
            if model == "student":
                labels = [_ratio(got[rt].get("speedup_same_runtime")) for rt in RUNTIMES if rt in got]
                ax.bar_label(bars, labels=labels, fontsize=8)
        ax.set_xticks(range(len(RUNTIMES)), [rt.replace("onnxruntime", "ORT") for rt in RUNTIMES], fontsize=8)
        ax.set_yscale("log")
        seq = rows[0]["seq_len"]
        ax.set(ylabel="sequences / s (log)", title=f"batch {batch} x {seq} tokens, {rows[0]['threads']} threads")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def plot_speed(rows: list[dict[str, Any]], png_path: str | Path) -> bool:
    """:func:`speed_figure` written atomically to ``png_path``; False (nothing written) without rows."""
    return save_figure(speed_figure(rows), png_path, what="deployment speed plot")
