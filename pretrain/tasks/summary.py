"""The downstream result's aggregates (means and spreads over seeds, shares of the teacher, macro average, gains),
its markdown tables and bar chart, and writing ``downstream.json`` / ``.md`` / ``.png``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.files import atomic_path, atomic_write_text


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Fill the aggregates of ``result`` in place: per task and model the mean and std over seeds of the score and
    of each metric, the share of the teacher's score; the macro average over tasks per model (std over seeds of
    the per-seed macro average); the gains of the student over each baseline (mean difference; spread =
    sqrt(std_student^2 + std_baseline^2), the seed-to-seed spread of the difference); per model the inference speed
    (mean over tasks). Returns ``result``."""
    teacher, student = result.get("teacher"), result.get("student")
    models = list(result["models"])
    per_seed: dict[str, list[list[float]]] = {m: [] for m in models}
    for t in result["tasks"].values():
        for m, r in t["results"].items():
            runs = r["runs"]
            r["score_mean"], r["score_std"] = _mean_std([x["score"] for x in runs])
            r["metrics_mean"] = {
                f"{s}/{k}": _mean_std([x["metrics"][s][k] for x in runs])[0]
                for s in runs[0]["metrics"]
                for k in runs[0]["metrics"][s]
            }
            r["metrics_std"] = {
                f"{s}/{k}": _mean_std([x["metrics"][s][k] for x in runs])[1]
                for s in runs[0]["metrics"]
                for k in runs[0]["metrics"][s]
            }
            per_seed[m].append([x["score"] for x in runs])
        ref = t["results"].get(teacher, {}).get("score_mean")
        for r in t["results"].values():
            r["share_of_teacher"] = (r["score_mean"] / ref) if ref else None
    macro: dict[str, dict[str, Any]] = {}
    for m in models:
        if not per_seed[m] or any(len(s) != len(per_seed[m][0]) for s in per_seed[m]):
            continue
        by_seed = np.mean(np.asarray(per_seed[m]), axis=0)
        macro[m] = dict(zip(("mean", "std"), _mean_std(by_seed), strict=False))
    ref = macro.get(teacher, {}).get("mean") if teacher is not None else None
    for m in macro:
        macro[m]["share_of_teacher"] = macro[m]["mean"] / ref if ref else None
    result["macro"] = macro
    result["gains"] = _gains(result, macro, models, teacher, student)
    for m in models:
        speeds = [
            x["inference_examples_per_s"]
            for t in result["tasks"].values()
            for x in t["results"].get(m, {}).get("runs", [])
        ]
        result["models"][m]["inference_examples_per_s"] = float(np.mean(speeds)) if speeds else None
    return result


def _gains(
    result: dict[str, Any], macro: dict[str, Any], models: list[str], teacher: str | None, student: str | None
) -> dict[str, Any]:
    """The student's gain over each other model except the teacher, per task (and macro with several tasks)."""
    gains: dict[str, Any] = {}
    if student not in models:
        return gains
    for b in models:
        if b in (student, teacher):
            continue
        g = {}
        for tname, t in result["tasks"].items():
            s, o = t["results"].get(student), t["results"].get(b)
            if s and o:
                g[tname] = _gain(s["score_mean"], s["score_std"], o["score_mean"], o["score_std"])
        if student in macro and b in macro and len(result["tasks"]) > 1:
            g["macro"] = _gain(macro[student]["mean"], macro[student]["std"], macro[b]["mean"], macro[b]["std"])
        gains[b] = g
    return gains


def _gain(s_mean: float, s_std: float, b_mean: float, b_std: float) -> dict[str, Any]:
    spread = math.sqrt(s_std**2 + b_std**2)
    gain = s_mean - b_mean
    return {"gain": gain, "spread": spread, "beats_by_more_than_spread": bool(gain > spread)}


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _pm(mean: float, std: float, n: int) -> str:
    return f"{_pct(mean)} ± {_pct(std)}" if n > 1 else _pct(mean)


def render_downstream_markdown(result: dict[str, Any], png_name: str | None = None) -> str:
    """Markdown of a :func:`pretrain.tasks.downstream.run_downstream` result: one table per task (model, parameters,
    inference examples/s (median [min-max] over the seeds' runs; same-architecture models whose ranges overlap are
    said to have the same speed), each metric and the score as mean ± std over seeds in percent, share of the teacher's
    score), the macro-average table and the gains of the distilled student over each baseline with the seed spread.
    ``png_name``: a bar chart to link. Pure function of ``result`` (the run report includes it)."""
    mode, seeds = result["mode"], result["seeds"]
    teacher, student = result.get("teacher"), result.get("student")
    what = (
        f"fine-tuned, {seeds} seed(s), mean ± std"
        if mode == "finetune"
        else "linear probe of frozen mean-pooled embeddings"
    )
    lines = [f"## Downstream evaluation ({what})", ""]
    lines.append(
        f"Scores in percent (accuracy, F1, correlations x 100). Teacher (share = 100%): `{teacher}`"
        + (f"; distilled student: `{student}`." if student else ".")
    )
    lines.append("")
    for tname, t in result["tasks"].items():
        lines += _task_table(tname, t, mode, result["models"])
    if result.get("macro") and len(result["tasks"]) > 1:
        lines += _macro_table(result)
    if result.get("gains"):
        lines += _gains_table(result["gains"], student)
    if mode == "finetune":
        lines += [_throughput_line(result), ""]
    for note in result.get("notes", []):
        lines.append(f"Note: {note}.")
    if result.get("notes"):
        lines.append("")
    if png_name:
        lines += [f"![downstream scores]({png_name})", ""]
    return "\n".join(lines)


def _task_table(tname: str, t: dict[str, Any], mode: str, models: dict[str, Any]) -> list[str]:
    """One task's heading, settings line (fine-tuning) and table."""
    split_note = ", ".join(t["report_splits"])
    s = t["settings"]
    used = t["manifest"]["splits"]
    counts = ", ".join(f"{k} {v['used']['count']:,}" for k, v in used.items())
    lines = [f"### {tname} ({t['kind']}; reported on {split_note}; {counts})", ""]
    if mode == "finetune":
        lines.append(
            f"Settings: {s.get('head', 'cls')} head, {s['epochs']} epochs, lr {s['lr']:g}, batch {s['batch_size']}, "
            f"max length {s['max_length']}, warmup {s['warmup_ratio']:g}, weight decay "
            f"{s['weight_decay']:g}"
            + ("; epoch chosen on dev" if t["select_split"] not in t["report_splits"] else "")
            + "."
        )
        lines.append("")
    first = next(iter(t["results"].values()))
    mkeys = list(first["metrics_mean"])
    header = (
        ["model", "params", "inference ex/s"] + mkeys + (["score"] if len(mkeys) > 1 else []) + ["share of teacher"]
    )
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|")
    for m, r in t["results"].items():
        n = len(r["runs"])
        row = [f"`{m}`", _params(models[m]["params"]), _speed([x["inference_examples_per_s"] for x in r["runs"]])]
        row += [_pm(r["metrics_mean"][k], r["metrics_std"][k], n) for k in mkeys]
        if len(mkeys) > 1:
            row.append(_pm(r["score_mean"], r["score_std"], n))
        share = r.get("share_of_teacher")
        row.append("-" if share is None else f"{100 * share:.1f}%")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += _same_speed_lines(t["results"], models)
    return lines


def _speed(samples: list[float]) -> str:
    """Examples/s of a model's runs: the one value, or ``median [min-max]`` over the runs (seeds)."""
    if len(samples) == 1:
        return f"{samples[0]:,.0f}"
    return f"{np.median(samples):,.0f} [{min(samples):,.0f}-{max(samples):,.0f}]"


def _same_speed_lines(results: dict[str, Any], models: dict[str, Any]) -> list[str]:
    """A line per pair of models with equal parameter counts (same architecture) whose examples/s ranges over the
    runs overlap (or that have one run each): their speed difference is timing noise."""
    names = list(results)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if models[a]["params"] != models[b]["params"]:
                continue
            sa = [x["inference_examples_per_s"] for x in results[a]["runs"]]
            sb = [x["inference_examples_per_s"] for x in results[b]["runs"]]
            single = len(sa) == 1 and len(sb) == 1
            if single or (min(sa) <= max(sb) and min(sb) <= max(sa)):
                why = "one timing each" if single else "their ranges over the runs overlap"
                out.append(f"`{a}` and `{b}` have the same architecture ({why}): the same speed within timing noise.")
    return [*out, ""] if out else []


def _macro_table(result: dict[str, Any]) -> list[str]:
    lines = [
        "### Macro average over tasks",
        "",
        "| model | params | macro score | share of teacher |",
        "| --- | ---: | ---: | ---: |",
    ]
    for m, r in result["macro"].items():
        share = r.get("share_of_teacher")
        lines.append(
            f"| `{m}` | {_params(result['models'][m]['params'])} | {_pm(r['mean'], r['std'], result['seeds'])} | "
            + ("-" if share is None else f"{100 * share:.1f}%")
            + " |"
        )
    lines.append("")
    return lines


def _gains_table(gains: dict[str, Any], student: str | None) -> list[str]:
    lines = [
        f"### Gain of `{student}` over each baseline (points; spread = sqrt(std_student² + std_baseline²) over seeds)",
        "",
        "| baseline | task | gain | spread | beats by more than the spread |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for b, g in gains.items():
        for tname, x in g.items():
            lines.append(
                f"| `{b}` | {tname} | {100 * x['gain']:+.1f} | {100 * x['spread']:.1f} | "
                f"{'yes' if x['beats_by_more_than_spread'] else 'no'} |"
            )
    lines.append("")
    return lines


def _throughput_line(result: dict[str, Any]) -> str:
    rows = [
        (m, np.mean([x["train_examples_per_s"] for t in result["tasks"].values() for x in t["results"][m]["runs"]]))
        for m in result["models"]
        if any(m in t["results"] for t in result["tasks"].values())
    ]
    return (
        "Fine-tuning throughput (examples/s): "
        + ", ".join(f"`{m}` {v:,.0f}" for m, v in rows)
        + f"; total {result.get('timing', {}).get('seconds', 0):.0f} s on {result.get('device')} "
        f"({result.get('torch_threads')} threads)."
    )


def score_name(task: dict[str, Any]) -> str:
    """What a task's score is, with its split: ``"test accuracy"`` for one metric, ``"mean of test f1, test
    accuracy"`` for several (:func:`pretrain.tasks.metrics.score`: the mean over the reported splits' metrics)."""
    first = next(iter(task["results"].values()))
    names = [k.replace("/", " ") for k in first["metrics_mean"]]
    return names[0] if len(names) == 1 else "mean of " + ", ".join(names)


def downstream_figure(result: dict[str, Any]) -> Any:
    """The matplotlib Figure of :func:`plot_downstream`: a grouped bar chart (one group per task, plus the macro
    average when there are several tasks; one bar per model; error bars = std over seeds). The y-axis runs from 0 (or
    the lowest negative score) to at least 100 and names the metric and split (in the y label when all tasks share
    one, else under each task's name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    groups = list(result["tasks"])
    what = {t: score_name(result["tasks"][t]) for t in groups}
    vals = {m: [result["tasks"][t]["results"][m]["score_mean"] * 100 for t in groups] for m in models}
    errs = {m: [result["tasks"][t]["results"][m]["score_std"] * 100 for t in groups] for m in models}
    shared = what[groups[0]] if len(set(what.values())) == 1 else None
    labels = list(groups) if shared else [f"{t}\n({what[t]})" for t in groups]
    if len(groups) > 1 and result.get("macro"):
        labels.append("macro average")
        for m in models:
            vals[m].append(result["macro"][m]["mean"] * 100)
            errs[m].append(result["macro"][m]["std"] * 100)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels) * max(1, len(models)) / 2), 3.6))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(labels))
    for i, m in enumerate(models):
        ax.bar(x + (i - (len(models) - 1) / 2) * width, vals[m], width, yerr=errs[m], capsize=3, label=m)
    lo = min(min(v) for v in vals.values())
    hi = max(max(v) + max(e) for v, e in zip(vals.values(), errs.values(), strict=False))
    ax.set_ylim(min(0.0, 1.1 * lo), max(100.0, 1.05 * hi))  # from 0 (below it only for negative correlations)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(f"{shared} (%)" if shared else "task score (%), metric and split under each task")
    ax.set_title(
        f"downstream {result['mode']}: score per task and model\n(mean ± std over {result['seeds']} seed(s))",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=min(4, len(models)))
    fig.tight_layout()
    return fig


def plot_downstream(result: dict[str, Any], path: str | os.PathLike) -> bool:
    """:func:`downstream_figure` written atomically as PNG to ``path``. False when matplotlib is missing."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return False
    fig = downstream_figure(result)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def write_outputs(result: dict[str, Any], output: str | os.PathLike, *, plot: bool = True) -> None:
    """Write ``downstream.png`` (if ``plot``), ``downstream.md`` and, last, ``downstream.json`` into ``output``,
    each atomically (:mod:`data_prep.files`), so a ``downstream.json`` present is always a complete result."""
    out = Path(output)
    png = plot and plot_downstream(result, out / "downstream.png")
    atomic_write_text(
        out / "downstream.md",
        render_downstream_markdown(result, "downstream.png" if png else None),
        what="downstream report",
    )
    atomic_write_text(
        out / "downstream.json", json.dumps(result, indent=1, default=_json_default) + "\n", what="downstream results"
    )


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
