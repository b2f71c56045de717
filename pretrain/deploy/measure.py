"""The deployment step of a run (``make demo``'s last step): ONNX fp32 and int8 of the run's sentence-encoder
student in its folder, each checked, the teacher exported for comparison, speed per runtime, and the report's
deployment section.

``python -m pretrain.deploy.measure RUN --teacher T --data D`` after ``python -m pretrain.evaluate`` wrote
``RUN/report.json``:

- ``RUN/student/onnx/``: model.onnx and model_qint8_<isa>.onnx (sentence-transformers' layout), checks.json;
- ``RUN/deploy/teacher/onnx/``: the teacher's graphs, for the speed comparison only;
- ``RUN/deploy.json``: the section (checks with verdicts, file sizes, speed rows with speed-ups, CPU, threads);
  ``RUN/deploy_speed.png``; and the same section as ``report.json["deployment"]``, with report.md re-rendered.

The checks (docs/deployment.md): fp32 ONNX vs PyTorch, max |diff| of last_hidden_state at batch 1 and 32 (mixed
lengths); int8 vs fp32 ONNX on the report's retrieval task (:mod:`pretrain.deploy.retrieval`: the same held-out
halves, so the fp32 graph reproduces the report's recall@1), the relative recall@1 drop against 0.5%, with the
cosine of the int8 to the fp32 embeddings. A failing int8 graph is still written; its verdict says FAIL with the
number. Nothing here draws from torch's or numpy's global random state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.cli import HelpFormatter, prog
from data_prep.errors import DistillError
from data_prep.files import atomic_dir, atomic_write_text
from pretrain.card import refresh_from_report
from pretrain.deploy.common import DeployError, cpu_info, load_tokenizer, load_torch_model
from pretrain.deploy.onnx_export import export_model
from pretrain.deploy.quantize import int8_filename, quantize_int8, quantize_static_int8
from pretrain.deploy.report_rows import plot_speed, speed_rows
from pretrain.deploy.retrieval import calibration_batches, onnx_embeddings, recall_at_1, run_halves
from pretrain.deploy.speed import benchmark
from pretrain.deploy.verify import TOLERANCES, CheckResult, OnnxRunner, check_outputs

INT8_MODES = ("dynamic", "dynamic-per-channel", "dynamic-per-channel-fp32-embeddings", "static")


@dataclasses.dataclass
class RunDeploySettings:
    """The knobs of :func:`deploy_run`: ``threads`` for every runtime; speed at ``batches`` x ``seq_len`` with
    ``warmup`` / ``repeats`` calls per batch size; ``int8``: one of :data:`INT8_MODES` (docs/deployment.md
    measured them on the demo student); ``exporter``: torch.onnx exporter (torchscript: 4-7x faster to run than
    dynamo, the same outputs to ~1e-6); the two tolerances."""

    threads: int = 2
    batches: tuple[int, ...] = (1, 32)
    seq_len: int = 128
    warmup: dict[int, int] = dataclasses.field(default_factory=lambda: {1: 3, 32: 1})
    repeats: dict[int, int] = dataclasses.field(default_factory=lambda: {1: 20, 32: 5})
    int8: str = "dynamic-per-channel"
    exporter: str = "torchscript"
    tolerance: float = TOLERANCES["fp32"]
    int8_tolerance: float = TOLERANCES["encoder"]


def _check_texts(tokenizer: Any, seqs: list[np.ndarray], n: int = 32) -> list[str]:
    """``n`` texts of mixed lengths (evenly spread over ``seqs`` sorted by length, longest first) decoded from the
    held-out halves, for the fp32 check at batch 1 (the first ones alone) and 32 (all, padded)."""
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    pick = order[np.linspace(0, len(order) - 1, min(n, len(order))).astype(int)]
    return [tokenizer.decode(seqs[i], skip_special_tokens=True) for i in pick]


def _int8(fp32: Path, out: Path, mode: str, data: str | Path) -> Path:
    if mode == "static":
        return quantize_static_int8(fp32, out, calibration_batches(data))
    per_channel, keep = mode.startswith("dynamic-per-channel"), mode.endswith("fp32-embeddings")
    return quantize_int8(fp32, out, per_channel=per_channel, exclude_embeddings=keep)


def _retrieval_check(
    fp32: Path, int8: Path, seqs: list[np.ndarray], pad_id: int, pooling: str, s: RunDeploySettings
) -> CheckResult:
    """int8 vs fp32 ONNX on the report's halves: relative recall@1 drop (a fraction) against ``s.int8_tolerance``."""
    e32 = onnx_embeddings(OnnxRunner(fp32, s.threads), seqs, pad_id, pooling=pooling)
    e8 = onnx_embeddings(OnnxRunner(int8, s.threads), seqs, pad_id, pooling=pooling)
    r32, r8 = recall_at_1(e32), recall_at_1(e8)
    cos = (e32 * e8).sum(1)
    drop = (r32 - r8) / r32 if r32 > 0 else 0.0
    detail = {"recall_fp32": r32, "recall_int8": r8, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    detail["documents"] = len(seqs) // 2
    return CheckResult(
        "int8 retrieval recall@1 relative drop", drop, s.int8_tolerance, "fraction", drop <= s.int8_tolerance,
        str(int8), detail,
    )  # fmt: skip


def _export_folder(model_dir: Path, out: Path, s: RunDeploySettings, data: str | Path, texts: list[str]):
    """model.onnx + int8 of ``model_dir`` into ``out`` (atomic), with the fp32 check; (fp32 path, int8 path, check)."""
    model, tokenizer = load_torch_model(model_dir, "encoder"), load_tokenizer(model_dir)
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)
        fp32 = export_model(model, "encoder", tmp / "model.onnx", exporter=s.exporter)
        check = check_outputs(model, "encoder", fp32, tokenizer, texts, s.tolerance)
        _int8(fp32, tmp / int8_filename(), s.int8, data)
    check.file = str(out / "model.onnx")
    return out / "model.onnx", out / int8_filename(), check


def deploy_run(
    run_dir: str | Path, teacher: str | Path, data: str | Path, settings: RunDeploySettings | None = None
) -> dict[str, Any]:
    """The deployment step of the run in ``run_dir`` (the module docstring); returns the section written to
    deploy.json and report.json. Raises :class:`DeployError` without RUN/student or RUN/report.json, or for an
    unknown int8 mode."""
    s, run_dir, t0, load = settings or RunDeploySettings(), Path(run_dir), time.perf_counter(), os.getloadavg()[0]
    if s.int8 not in INT8_MODES:
        raise DeployError(f"int8 mode {s.int8!r} is not one of {', '.join(INT8_MODES)}")
    report_path, student = run_dir / "report.json", run_dir / "student"
    if not report_path.is_file() or not (student / "config.json").is_file():
        raise DeployError(f"{run_dir}: needs student/ and report.json (train, then python -m pretrain.evaluate)")
    report = json.loads(report_path.read_text())
    retrieval = report["meta"].get("retrieval") or {}
    seqs, pad_id = run_halves(data, retrieval)
    texts = _check_texts(load_tokenizer(student), seqs)
    st32, st8, st_check = _export_folder(student, student / "onnx", s, data, texts)
    te32, te8, te_check = _export_folder(Path(teacher), run_dir / "deploy" / "teacher" / "onnx", s, data, texts)
    int8_check = _retrieval_check(st32, st8, seqs, pad_id, retrieval.get("pooling", "mean"), s)
    atomic_write_text(student / "onnx" / "checks.json", _checks_json([st_check, int8_check]))
    rows = speed_rows(
        _bench(Path(teacher), {"onnxruntime-fp32": te32, "onnxruntime-int8": te8}, s),
        _bench(student, {"onnxruntime-fp32": st32, "onnxruntime-int8": st8}, s),
    )
    section = {
        "checks": {"student_fp32": dataclasses.asdict(st_check), "teacher_fp32": dataclasses.asdict(te_check)},
        "int8": {
            "mode": s.int8,
            "student": dataclasses.asdict(int8_check),
            "report_recall_at_1": (report.get("student") or {}).get("recall_at_1"),
        },
        "files": {"student": _sizes(st32, st8, run_dir), "teacher": _sizes(te32, te8, run_dir)},
        "speed": rows,
        "machine": {**cpu_info(), "threads": s.threads, "exporter": s.exporter, "loadavg_1m": load},
        "png": "deploy_speed.png" if plot_speed(rows, run_dir / "deploy_speed.png") else None,
    }
    section["seconds"] = round(time.perf_counter() - t0, 1)
    _write(run_dir, report, section)
    return section


def _bench(model_dir: Path, onnx_files: dict[str, Path], s: RunDeploySettings) -> list[dict]:
    return benchmark(
        model_dir, onnx_files, kind="encoder", threads=s.threads, batches=s.batches, seq_len=s.seq_len,
        warmup=s.warmup, repeats=s.repeats,
    )  # fmt: skip


def _checks_json(checks: list[CheckResult]) -> str:
    return json.dumps([dataclasses.asdict(c) for c in checks], indent=2) + "\n"


def _sizes(fp32: Path, int8: Path, run_dir: Path) -> dict[str, Any]:
    a, b = fp32.stat().st_size, int8.stat().st_size
    rel = lambda p: str(p.relative_to(run_dir)) if p.is_relative_to(run_dir) else str(p)  # noqa: E731
    return {"fp32": rel(fp32), "int8": rel(int8), "fp32_bytes": a, "int8_bytes": b, "int8_percent": 100.0 * b / a}


def _write(run_dir: Path, report: dict, section: dict) -> None:
    """deploy.json, then report.json with the section, then report.md re-rendered (``pretrain.report``)."""
    from pretrain.report import render_markdown

    atomic_write_text(run_dir / "deploy.json", json.dumps(section, indent=2) + "\n", what="deployment results")
    report["deployment"] = section
    png = "loss_curves.png" if (run_dir / "loss_curves.png").is_file() else None
    atomic_write_text(run_dir / "report.md", render_markdown(report, png), what="evaluation report")
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2) + "\n", what="evaluation report")
    refresh_from_report(report, run_dir / "report.json")  # the student's card gets its onnx/ checks


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.deploy.measure RUN --teacher T --data D``: exit 0, 1 (a check outside its tolerance:
    everything is written, the FAIL lines name it) or 2 (bad input)."""
    p = argparse.ArgumentParser(
        prog=prog("python -m pretrain.deploy.measure"), description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )  # fmt: skip
    p.add_argument("run_dir", help="the run directory (student/, report.json from python -m pretrain.evaluate)")
    p.add_argument("--teacher", required=True, help="the teacher's folder (embedded:NAME or a directory)")
    p.add_argument("--data", required=True, help="the run's shard directory (the report's retrieval documents)")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    p.add_argument("--int8", choices=INT8_MODES, default=RunDeploySettings.int8, help="int8 quantization")
    a = p.parse_args(argv)
    try:
        from data_prep.embedded import resolve_model

        section = deploy_run(
            a.run_dir, resolve_model(a.teacher), a.data, RunDeploySettings(threads=a.threads, int8=a.int8)
        )
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    checks = [section["checks"]["student_fp32"], section["checks"]["teacher_fp32"], section["int8"]["student"]]
    for c in checks:
        print(CheckResult(**c).line())
    print(f"wrote {Path(a.run_dir) / 'deploy.json'} ({section['seconds']:.0f} s)")
    return 0 if all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
