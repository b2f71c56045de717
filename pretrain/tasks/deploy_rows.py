"""The deployment rows of task distillation's table (``make task-demo``, docs/task-distillation.md): each saved
classifier in ONNX fp32 and int8 with its checks, dev and test accuracy over the seeds, and the speed of the teacher
and each row's first seed in PyTorch fp32, ONNX Runtime fp32 and int8, timed interleaved.

    python -m pretrain.tasks.deploy_rows --task embedded:rotten-tomatoes --teacher DIR \
        --row "LABEL=GLOB" [--row ...] --output runs/task/deploy [--threads 2]

``GLOB`` matches each seed's classifier folder (``runs/task/distillator-*/student``); every folder gets its
``onnx/`` (model.onnx, model_qint8_<isa>.onnx, checks.json, classifier.json), reused when classifier.json is there.
Writes ``OUTPUT/deploy.json`` and ``OUTPUT/deploy.md`` and prints the table. Exit status 1 when a check failed (the
table still says which), 2 for bad input.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep.errors import DistillError
from data_prep.files import atomic_write_text
from pretrain.deploy.classifier import export_classifier
from pretrain.deploy.common import DeployError
from pretrain.deploy.compare import RUNTIMES, classifier_runners, interleaved_speed, speed_markdown
from pretrain.deploy.quantize import quantize_int8


def export_or_reuse(model_dir: Path, task: Any, exporter: str, per_channel: bool = True) -> dict[str, Any]:
    """``model_dir/onnx/classifier.json`` when it is there and was made with the same ``per_channel``, else
    :func:`export_classifier` into ``model_dir/onnx`` (dynamic int8, one weight scale per output channel when
    ``per_channel``), whose JSON it writes there too; the dict of :meth:`ClassifierExport.to_json` plus
    ``quantization``."""
    quantization = "dynamic int8, " + ("per-channel" if per_channel else "per-tensor")
    done = model_dir / "onnx" / "classifier.json"
    if done.is_file() and json.loads(done.read_text()).get("quantization") == quantization:
        return json.loads(done.read_text())
    quantize = functools.partial(quantize_int8, per_channel=per_channel)
    result = export_classifier(model_dir, task, exporter=exporter, quantize=quantize).to_json()
    result["quantization"] = quantization
    atomic_write_text(done, json.dumps(result, indent=2) + "\n")
    return result


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise_row(label: str, exports: list[dict[str, Any]]) -> dict[str, Any]:
    """One row's accuracy per precision and split over its seeds (mean, std, in points), the checks' worst values
    and verdict, and the ONNX files' sizes (bytes, first seed)."""
    acc = {
        precision: {
            split: _mean_std([100 * e["scores"][precision][split] for e in exports])
            for split in exports[0]["scores"][precision]
        }
        for precision in ("fp32", "int8")
    }
    fp32_diff = max(e["checks"][0]["value"] for e in exports)
    int8_drop = max(e["checks"][1]["value"] for e in exports)
    return {
        "label": label,
        "seeds": len(exports),
        "accuracy": acc,
        "fp32_max_abs_diff": fp32_diff,
        "int8_max_drop_points": int8_drop,
        "fp32_passed": all(e["checks"][0]["passed"] for e in exports),
        "int8_passed": all(e["checks"][1]["passed"] for e in exports),
        "int8_tolerance": exports[0]["checks"][1]["tolerance"],
        "passed": all(e["passed"] for e in exports),
        "sizes": exports[0]["sizes"],
        "model_dirs": [e["model_dir"] for e in exports],
        "onnx": exports[0]["files"],
    }


def _speed_cell(speed: list[dict[str, Any]], name: str, runtime: str, batch: int) -> dict[str, Any] | None:
    return next((r for r in speed if r["model"] == name and r["runtime"] == runtime and r["batch"] == batch), None)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(rows: list[dict[str, Any]], speed: list[dict[str, Any]]) -> str:
    """The deployment table: per row and runtime the accuracy (ONNX rows; PyTorch = ONNX fp32, see the check),
    the checks, throughput and latency at batch 1 and 32 and both speed-ups; then the full speed table."""
    teacher_test = rows[0]["accuracy"]["fp32"]["test"][0]
    lines = [
        "| model | runtime | test accuracy | dev accuracy | seeds | share of teacher | check | "
        "batch 1: seq/s (p50 / p95 ms) | batch 32: seq/s (p50 / p95 ms) | speed-up same runtime (b1 / b32) | "
        "speed-up vs PyTorch fp32 teacher (b1 / b32) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        for runtime in RUNTIMES:
            precision = "int8" if runtime.endswith("int8") else "fp32"
            a = row["accuracy"][precision]
            test, dev = (f"{m:.1f} ± {s:.1f}" for m, s in (a["test"], a["dev"]))
            check = _check_text(row, precision if runtime != "pytorch-fp32" else "torch")
            cells = [_speed_cell(speed, row["label"], runtime, b) for b in (1, 32)]
            thr = [f"{c['throughput_seq_s']:.1f} ({c['p50_ms']:.1f} / {c['p95_ms']:.1f})" if c else "-" for c in cells]
            same = " / ".join(_x(c["speedup_same_runtime"]) if c else "-" for c in cells)
            vs_pt = " / ".join(_x(c["speedup_vs_pytorch_teacher"]) if c else "-" for c in cells)
            lines.append(
                f"| {row['label']} | {runtime} | {test} | {dev} | {row['seeds']} | "
                f"{a['test'][0] / teacher_test:.1%} | {check} | {thr[0]} | {thr[1]} | {same} | {vs_pt} |"
            )
    return "\n".join(lines) + "\n\n" + speed_markdown(speed)


def _check_text(row: dict[str, Any], which: str) -> str:
    if which == "torch":
        return "reference"
    if which == "fp32":
        return f"{'PASS' if row['fp32_passed'] else 'FAIL'} max abs logit diff {row['fp32_max_abs_diff']:.1e}"
    verdict = "PASS" if row["int8_passed"] else "FAIL"
    return f"{verdict} drop {row['int8_max_drop_points']:.2f} pt (tolerance {row['int8_tolerance']:g})"


def moonshot_lines(rows: list[dict[str, Any]], speed: list[dict[str, Any]], share: float, times: float) -> list[str]:
    """Per student row: its int8 test accuracy as a share of the teacher's (fp32 and int8) and its int8-vs-int8
    speed-up at batch 1 and 32, against the target (``share`` of the teacher's test accuracy at ``times`` its
    speed), with the shortfall when it misses."""
    t = rows[0]["accuracy"]
    out = []
    for row in rows[1:]:
        test8 = row["accuracy"]["int8"]["test"][0]
        s32, s8 = test8 / t["fp32"]["test"][0], test8 / t["int8"]["test"][0]
        ups = [
            c["speedup_same_runtime"] for b in (1, 32) if (c := _speed_cell(speed, row["label"], "onnxruntime-int8", b))
        ]
        short = []
        if s32 < share:
            short.append(f"share {100 * (share - s32):.1f} points below {share:.0%}")
        if not ups or min(ups) < times:
            short.append(f"speed-up {times - min(ups):.2f}x below {times:g}x" if ups else "speed not measured")
        ups_txt = " / ".join(f"{u:.2f}x" for u in ups) or "-"
        out.append(
            f"- {row['label']}: int8 test accuracy {test8:.1f} = {s32:.1%} of the fp32 teacher's ({s8:.1%} of the "
            f"int8 teacher's), int8 vs int8 speed-up {ups_txt} at batch 1 / 32; target >= {share:.0%} at >= "
            f"{times:g}x: {'met' if not short else 'missed: ' + ', '.join(short)}"
        )
    return out


def run(
    task_name: str,
    teacher: str,
    rows: list[tuple[str, str]],
    output: Path,
    *,
    threads: int,
    rounds: int,
    exporter: str,
    per_channel: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Export and check every folder of ``rows`` (``(label, glob)``; the teacher first), time the first seed of
    each interleaved, write ``output/deploy.json`` / ``deploy.md``. Returns (rows, speed records). Raises
    :class:`DeployError` for a glob that matches no folder."""
    from pretrain.tasks import SplitConfig, load_task

    task = load_task(task_name, split=SplitConfig(max_eval=1000))  # the splits of the table's step 4
    summaries, models = [], {}
    for label, pattern in [("teacher (fine-tuned)", teacher), *rows]:
        dirs = sorted(Path(d) for d in glob.glob(pattern))
        if not dirs:
            raise DeployError(f"--row {label}={pattern}: no model folder matches")
        exports = [export_or_reuse(d, task, exporter, per_channel) for d in dirs]
        summaries.append(summarise_row(label, exports))
        models[label] = classifier_runners(dirs[0], exports[0]["files"], threads)
    speed = interleaved_speed(models, teacher="teacher (fine-tuned)", threads=threads, rounds=rounds)
    text = markdown(summaries, speed) + "\n" + "\n".join(moonshot_lines(summaries, speed, 0.99, 4.0)) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "deploy.json", json.dumps({"rows": summaries, "speed": speed}, indent=2) + "\n")
    atomic_write_text(output / "deploy.md", text)
    print(text)
    return summaries, speed


def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring). Exit 0, 1 (a check failed) or 2 (bad input)."""
    p = argparse.ArgumentParser(prog="python -m pretrain.tasks.deploy_rows", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, help="the task the classifiers were trained on")
    p.add_argument("--teacher", required=True, help="the fine-tuned teacher's folder (the speed-ups' reference)")
    p.add_argument("--row", action="append", default=[], help="LABEL=GLOB of each seed's classifier folder")
    p.add_argument("--output", required=True, help="folder for deploy.json and deploy.md")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="torchscript", help="torch.onnx exporter")
    p.add_argument(
        "--per-tensor", action="store_true", help="int8 with one scale per weight tensor (default: per output channel)"
    )
    a = p.parse_args(argv)
    try:
        rows = []
        for spec in a.row:
            label, sep, pattern = spec.partition("=")
            if not sep or not label or not pattern:
                raise DeployError(f"--row {spec!r}: expected LABEL=GLOB")
            rows.append((label, pattern))
        summaries, _ = run(
            a.task,
            a.teacher,
            rows,
            Path(a.output),
            threads=a.threads,
            rounds=a.rounds,
            exporter=a.exporter,
            per_channel=not a.per_tensor,
        )
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0 if all(r["passed"] for r in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
