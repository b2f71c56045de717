"""Rendering of the evaluation report: atomic file writes, the loss-curve PNG from ``metrics.jsonl``, report.md.

Kept apart from :mod:`pretrain.evaluate` (which computes the numbers) so that the report can be re-rendered from a
``report.json`` without loading models. matplotlib runs with the non-interactive Agg backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data_prep.files import atomic_write_bytes
from pretrain.metrics import read_metrics

MODELS = ("teacher", "student_init", "student")

# (key, label, format) of the rows of report.md, in order; rows whose key no model has are left out.
ROWS = (
    ("params", "parameters (encoder)", "{:,}"),
    ("tokens_per_s", "inference tokens/s", "{:,.0f}"),
    ("speedup", "speed-up vs teacher", "{:.2f}x"),
    ("recall_at_1", "retrieval recall@1 (half -> other half)", "{:.3f}"),
    ("embedding_cosine", "embedding cosine to teacher", "{:.4f}"),
    ("mlm_loss", "MLM loss (nats / masked token)", "{:.4f}"),
    ("perplexity", "MLM perplexity", "{:.2f}"),
    ("mlm_accuracy", "MLM accuracy (masked tokens)", "{:.4f}"),
    ("kl_to_teacher", "KL to teacher (nats, T=1, masked tokens)", "{:.4g}"),
    ("agreement", "top-1 agreement with teacher", "{:.4f}"),
)


def _is_valid_record(rec: dict) -> bool:
    return rec.get("split") in ("valid", "eval")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: Iterable[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        if _number(rec.get("step")) and _number(rec.get(key)):
            xs.append(rec["step"])
            ys.append(rec[key])
    return xs, ys


# Keys of the trainer's valid records (pretrain.trainer): losses (nats) and scores in [0, 1].
VALID_LOSSES = ("mlm_loss", "kl_to_teacher")
VALID_SCORES = ("mlm_accuracy", "agreement", "hidden_cosine", "pooled_cosine")


def curve_keys(records: list[dict]) -> dict[str, list[str]]:
    """What :func:`plot_loss_curves` draws from ``metrics.jsonl`` records (``"split": "train" | "valid"``):
    ``train``: the total ``loss`` and each logged part ``loss_<term>`` (``loss_scale`` excluded); ``valid_losses``
    and ``valid_scores``: the valid records' keys of :data:`VALID_LOSSES` / :data:`VALID_SCORES` that have values."""
    train = [r for r in records if not _is_valid_record(r)]
    valid = [r for r in records if _is_valid_record(r)]
    found = lambda recs, keys: [k for k in keys if any(_number(r.get(k)) for r in recs)]  # noqa: E731
    parts = sorted(
        {k for r in train for k, v in r.items() if k.startswith("loss_") and k != "loss_scale" and _number(v)}
    )
    return {
        "train": found(train, ["loss"]) + parts,
        "valid_losses": found(valid, VALID_LOSSES),
        "valid_scores": found(valid, VALID_SCORES),
    }


def plot_loss_curves(metrics_path: str | Path, png_path: str | Path) -> bool:
    """Plot ``metrics.jsonl`` against the optimizer step into ``png_path`` (written atomically).

    Panels: the total train ``loss`` with the valid losses (MLM loss, KL to the teacher) as markers; each part of the
    train loss (``loss_<term>``, unweighted as logged; log scale when all positive); the valid scores (accuracy,
    agreement, hidden / pooled cosine to the teacher). Panels without data are left out. Returns False (and writes
    nothing) when the file holds no train loss and no valid point.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if not _is_valid_record(r)]
    valid = [r for r in records if _is_valid_record(r)]
    keys = curve_keys(records)
    parts = [k for k in keys["train"] if k != "loss"]
    panels = [
        p
        for p, on in (
            ("loss", "loss" in keys["train"] or keys["valid_losses"]),
            ("parts", parts),
            ("scores", keys["valid_scores"]),
        )
        if on
    ]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=False):
        if panel == "loss":
            if "loss" in keys["train"]:
                ax.plot(*_series(train, "loss"), label="train loss (weighted total)", lw=1.2)
            for k in keys["valid_losses"]:
                ax.plot(*_series(valid, k), "o-", ms=4, lw=0.8, label=f"valid {k}")
            ax.set(xlabel="step", ylabel="loss", title="loss")
        elif panel == "parts":
            positive = True
            for k in parts:
                xs, ys = _series(train, k)
                positive &= all(y > 0 for y in ys)
                ax.plot(xs, ys, label=k, lw=1.0)
            if positive:
                ax.set_yscale("log")
            ax.set(xlabel="step", ylabel="unweighted loss term", title="train loss terms")
        else:
            for k in keys["valid_scores"]:
                ax.plot(*_series(valid, k), "o-", ms=4, lw=0.8, label=k)
            ax.set(xlabel="step", ylabel="score", title="valid: agreement with the teacher")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue(), what="loss curves plot")
    return True


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    return fmt.format(value) if _number(value) else str(value)


def render_markdown(report: dict, png_name: str | None) -> str:
    """report.md: the paths, a table (rows: metrics, columns: teacher / student at init / distilled student),
    what each number means, and the loss-curve image when ``png_name`` is given."""
    meta = report.get("meta", {})
    cols = [m for m in MODELS if report.get(m)]
    names = {"teacher": "teacher", "student_init": "student (init)", "student": "student (distilled)"}
    lines = ["# Distillation report", ""]
    for m in MODELS:
        path = meta.get("paths", {}).get(m)
        lines.append(f"- {names[m]}: `{path}`" if path else f"- {names[m]}: not evaluated")
    lines += [
        f"- data: `{meta.get('paths', {}).get('data')}` (split `{meta.get('split')}`)",
        f"- date: {meta.get('date')}, device: {meta.get('device')}",
        "",
        "| metric | " + " | ".join(names[m] for m in cols) + " |",
        "| --- |" + " ---: |" * len(cols),
    ]
    for key, label, fmt in ROWS:
        if any(key in report[m] for m in cols):
            lines.append(f"| {label} | " + " | ".join(_cell(report[m].get(key), fmt) for m in cols) + " |")
    ret, mlm, bench = meta.get("retrieval", {}), meta.get("mlm"), meta.get("throughput", {})
    lines += [
        "",
        "How the numbers were made:",
        "",
        f"- Throughput: encoder forward (no LM head), batch {bench.get('batch_size')} x "
        f"{bench.get('seq_length')} tokens, fastest of {bench.get('iters')} timed forwards per model (models "
        f"interleaved) after {bench.get('warmup')} warm-up, {meta.get('device')}, {meta.get('threads')} "
        "threads. Timings on a busy machine are noisy.",
        f"- Retrieval: {ret.get('num_documents')} held-out documents of at least {ret.get('min_tokens')} tokens "
        f"(capped to {ret.get('max_content_tokens')} tokens per half), each cut into two halves by tokens; the "
        f"{ret.get('pooling')}-pooled embedding of the first half must find its second half among all second "
        "halves by cosine (recall@1; chance is 1 / documents). Embedding cosine: mean cosine between the model's "
        "and the teacher's embedding of the same halves.",
    ]
    if mlm:
        lines.append(
            f"- MLM: {mlm.get('num_sequences')} held-out sequences, {mlm.get('num_masked')} masked tokens "
            f"({mlm.get('masking')}); the same masked batches for every model."
        )
    lines.append("")
    if report.get("downstream"):
        from pretrain.tasks.summary import render_downstream_markdown

        png = report["downstream"].get("png")
        table = render_downstream_markdown(report["downstream"], png)
        lines += ["#" + table if table.startswith("# ") else table, ""]  # a section of this report
    if png_name:
        lines += ["## Loss curves", "", f"![loss curves]({png_name})", ""]
    elif meta.get("metrics_file") is None:
        lines += ["No metrics.jsonl found next to the student: no loss curves.", ""]
    return "\n".join(lines)
