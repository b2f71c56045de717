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
    ("tokens_per_s", "inference tokens/s (median [min-max] of repeats)", "{:,.0f}"),
    ("speedup", "speed-up vs teacher", "{:.2f}x"),
    ("recall_at_1", "retrieval recall@1 (half -> other half)", "{:.3f}"),
    ("embedding_cosine", "embedding cosine to teacher (held-out documents)", "{:.4f}"),
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


# Axis labels of the valid scores: the valid split's numbers, named apart from the report's held-out "embedding cosine".
SCORE_LABELS = {
    "mlm_accuracy": "valid MLM accuracy",
    "agreement": "valid top-1 agreement",
    "hidden_cosine": "valid hidden cosine",
    "pooled_cosine": "valid pooled cosine",
}


def loss_curves_figure(records: list[dict]) -> Any:
    """The matplotlib Figure of :func:`plot_loss_curves` for ``metrics.jsonl`` records, or None with nothing to draw.

    Panels: train loss (total) with the valid losses as markers; the train loss parts (log scale when all positive);
    the valid scores. Linear axes start at 0. A valid series is drawn only with two or more points (one point is no
    curve: its value belongs in the report's table); a panel left without series is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if not _is_valid_record(r)]
    valid = [r for r in records if _is_valid_record(r)]
    keys = curve_keys(records)
    curve = lambda k: len(_series(valid, k)[0]) >= 2  # noqa: E731
    valid_losses = [k for k in keys["valid_losses"] if curve(k)]
    scores = [k for k in keys["valid_scores"] if curve(k)]
    parts = [k for k in keys["train"] if k != "loss"]
    has_loss = "loss" in keys["train"]
    panels = [p for p, on in (("loss", has_loss or valid_losses), ("parts", parts), ("scores", scores)) if on]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=False):
        if panel == "loss":
            if has_loss:
                ax.plot(*_series(train, "loss"), label="train loss (weighted total)", lw=1.2)
            for k in valid_losses:
                ax.plot(*_series(valid, k), "o-", ms=4, lw=0.8, label=f"valid {k}")
            title = "train loss" + (" and valid losses" if valid_losses else "")
            ax.set(xlabel="optimizer step", ylabel="loss (nats)", title=title)
            ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        elif panel == "parts":
            positive = True
            for k in parts:
                xs, ys = _series(train, k)
                positive &= all(y > 0 for y in ys)
                ax.plot(xs, ys, label=f"train {k}", lw=1.0)
            if positive:
                ax.set_yscale("log")
            ax.set(xlabel="optimizer step", ylabel="train loss term (unweighted, nats)", title="train loss terms")
        else:
            for k in scores:
                ax.plot(*_series(valid, k), "o-", ms=4, lw=0.8, label=SCORE_LABELS.get(k, f"valid {k}"))
            ax.set_ylim(0, 1.05)
            ax.set(xlabel="optimizer step", ylabel="valid score (0-1)", title="valid split: student vs teacher")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_loss_curves(metrics_path: str | Path, png_path: str | Path) -> bool:
    """Plot ``metrics.jsonl`` against the optimizer step into ``png_path`` (written atomically); the panels are
    those of :func:`loss_curves_figure`. Returns False (and writes nothing) when there is nothing to draw."""
    return save_figure(loss_curves_figure(read_metrics(metrics_path)), png_path, what="loss curves plot")


def save_figure(fig: Any, png_path: str | Path, *, what: str) -> bool:
    """Write a matplotlib figure as a PNG (110 dpi) to ``png_path`` atomically and close it; False (nothing
    written) for ``None``. Raises :class:`data_prep.files.DiskFullError` naming ``what``."""
    import io

    import matplotlib.pyplot as plt

    if fig is None:
        return False
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue(), what=what)
    return True


def training_provenance(metrics_path: str | Path | None) -> dict[str, Any] | None:
    """How the student was trained, read from the run directory of ``metrics_path`` (``RUN/metrics.jsonl``):
    ``steps`` (last train record's step), ``tokens_seen`` (all ranks), ``wall_seconds`` (first record's time minus
    its interval's ``seconds_per_step * step``, to the last record's time; float, s), ``world_size`` (ranks, from the
    latest checkpoint's ``checkpoint.json``; None without one), and ``valid`` (the last valid record's scores). None
    when the file is missing or holds no train record."""
    import json

    if metrics_path is None or not Path(metrics_path).is_file():
        return None
    records = read_metrics(metrics_path)
    train = [r for r in records if not _is_valid_record(r) and _number(r.get("step"))]
    if not train:
        return None
    first, last = train[0], train[-1]
    times = [r["time"] for r in records if _number(r.get("time"))]
    wall = None
    if times and _number(first.get("time")) and _number(first.get("seconds_per_step")):
        wall = max(times) - first["time"] + first["seconds_per_step"] * first["step"]
    world_size = None
    ckpt = Path(metrics_path).parent / "checkpoints"
    latest = ckpt / "latest"
    if latest.is_file():
        manifest = ckpt / latest.read_text().strip() / "checkpoint.json"
        if manifest.is_file():
            world_size = json.loads(manifest.read_text()).get("world_size")
    valid = [r for r in records if _is_valid_record(r)]
    try:  # the machine of each start of the run (pretrain.rundir.record_start)
        starts = json.loads((Path(metrics_path).parent / "environment.json").read_text()).get("starts", [])
    except (OSError, ValueError, AttributeError):
        starts = []
    return {
        "starts": starts,
        "steps": last["step"],
        "tokens_seen": last.get("tokens_seen"),
        "wall_seconds": wall,
        "world_size": world_size,
        "valid": {k: valid[-1][k] for k in VALID_SCORES if valid and _number(valid[-1].get(k))},
        "valid_step": valid[-1].get("step") if valid else None,
    }


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    return fmt.format(value) if _number(value) else str(value)


def _speed_cell(r: dict, spread: dict | None) -> str:
    """``median [min-max]`` tokens/s (``spread``: :func:`pretrain.evaluate.speed_stats`), or the single number of a
    report without the spread."""
    if not spread or not (_number(spread.get("min")) and _number(spread.get("max"))):
        return _cell(r.get("tokens_per_s"), "{:,.0f}")
    return f"{r.get('tokens_per_s'):,.0f} [{spread['min']:,.0f}-{spread['max']:,.0f}]"


def same_speed_pairs(report: dict, cols: list[str]) -> list[tuple[str, str]]:
    """Pairs of models with the same parameter count (the same architecture: the student and its initialisation)
    whose min-max tokens/s ranges (``report["meta"]["speed_spread"]``) overlap: their difference is timing noise."""
    spread = report.get("meta", {}).get("speed_spread") or {}
    pairs = []
    for i, a in enumerate(cols):
        for b in cols[i + 1 :]:
            if report[a].get("params") is None or report[a].get("params") != report[b].get("params"):
                continue
            sa, sb = spread.get(a, {}), spread.get(b, {})
            ends = (sa.get("min"), sa.get("max"), sb.get("min"), sb.get("max"))
            if all(_number(v) for v in ends) and sa["min"] <= sb["max"] and sb["min"] <= sa["max"]:
                pairs.append((a, b))
    return pairs


def _same_speed_note(report: dict, cols: list[str], names: dict[str, str]) -> str:
    notes = [
        f" {names[a]} and {names[b]} have the same architecture and their speed ranges overlap: the same speed "
        "within timing noise."
        for a, b in same_speed_pairs(report, cols)
    ]
    return "".join(notes)


def machine_summaries(starts: list[dict], *, python: bool = False) -> list[str]:
    """Each distinct training machine of a run's ``environment.json`` starts, once, in order: "CPU ..., GPUs, ranks;
    [python X, ]torch, transformers, DeepSpeed versions" (the report's sentence and the model card's list)."""
    seen: list[str] = []
    for st in starts:
        gpu = f"{st.get('gpus')} x {st.get('gpu')}" if st.get("gpu") else "no GPU"
        py = f"python {st.get('python')}, " if python else ""
        text = (
            f"CPU {st.get('cpu')}, {gpu}, {st.get('world_size')} rank(s); {py}torch {st.get('torch')}, "
            f"transformers {st.get('transformers')}, DeepSpeed {st.get('deepspeed')}"
        )
        if text not in seen:
            seen.append(text)
    return seen


def _training_machines(starts: list[dict]) -> str:
    """One sentence on the machines the run was trained on (its ``environment.json`` starts), each distinct one once."""
    if not starts:
        return "The run directory records no training hardware (a run from before environment.json)."
    return f"Trained on {'; then on '.join(machine_summaries(starts))} ({len(starts)} start(s), environment.json)."


def _provenance_lines(meta: dict) -> list[str]:
    """The training run's provenance (:func:`training_provenance`) and the evaluating machine's environment."""
    env, tr = meta.get("environment") or {}, meta.get("training")
    lines = []
    if tr:
        wall = tr.get("wall_seconds")
        tokens = tr.get("tokens_seen")
        lines.append(
            f"- Training (from metrics.jsonl): {tr.get('steps')} optimizer steps, "
            + (f"{tokens:,} tokens seen" if _number(tokens) else "tokens seen not logged")
            + (f", {wall:,.0f} s from the first step to the last record" if _number(wall) else ", time not logged")
            + f", ranks: {tr.get('world_size') if tr.get('world_size') is not None else 'not recorded'}. "
            + _training_machines(tr.get("starts") or [])
        )
        if tr.get("valid"):
            vals = ", ".join(f"{SCORE_LABELS.get(k, k)} {v:.4f}" for k, v in tr["valid"].items())
            lines.append(f"- Last valid record (step {tr.get('valid_step')}, valid split): {vals}.")
    else:
        lines.append("- Training: no metrics.jsonl with train records: steps, tokens and wall time unknown.")
    if env:
        lines.append(
            f"- Evaluation hardware: CPU {env.get('cpu')}, GPU {env.get('gpu') or 'none'}; torch "
            f"{env.get('torch')}, transformers {env.get('transformers')}."
        )
    return lines


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
            spread = meta.get("speed_spread") or {}
            cells = [
                _speed_cell(report[m], spread.get(m)) if key == "tokens_per_s" else _cell(report[m].get(key), fmt)
                for m in cols
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ret, mlm, bench = meta.get("retrieval", {}), meta.get("mlm"), meta.get("throughput", {})
    lines += [
        "",
        "How the numbers were made:",
        "",
        f"- Throughput: encoder forward (no LM head), batch {bench.get('batch_size')} x "
        f"{bench.get('seq_length')} tokens, {bench.get('iters')} timed forwards per model (models "
        f"interleaved) after {bench.get('warmup')} warm-up, {meta.get('device')}, {meta.get('threads')} "
        "threads; the table gives the median and [min-max] of the timed forwards. Timings on a busy machine are noisy."
        + _same_speed_note(report, cols, names),
        f"- Retrieval: {ret.get('num_documents')} held-out documents of at least {ret.get('min_tokens')} tokens "
        f"(capped to {ret.get('max_content_tokens')} tokens per half), each cut into two halves by tokens; the "
        f"{ret.get('pooling')}-pooled embedding of the first half must find its second half among all second "
        "halves by cosine (recall@1; chance is 1 / documents). Embedding cosine: mean cosine between the model's "
        "and the teacher's embedding of the same halves. It is not the training log's \"valid pooled cosine\" "
        "(metrics.jsonl `pooled_cosine`: the valid split's sequences, mean-pooled, see docs/metrics.md), so the two "
        "numbers differ.",
    ]
    lines += _provenance_lines(meta)
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
    if report.get("deployment"):  # written by python -m pretrain.deploy.measure, after the evaluation
        from pretrain.report_deployment import render_deployment_markdown

        lines += render_deployment_markdown(report["deployment"])
    if png_name:
        lines += ["## Loss curves", "", f"![loss curves]({png_name})", ""]
    elif meta.get("metrics_file") is None:
        lines += ["No metrics.jsonl found next to the student: no loss curves.", ""]
    return "\n".join(lines)
