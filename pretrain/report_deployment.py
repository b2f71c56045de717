"""report.md's deployment section, rendered from report.json's ``deployment`` entry (written by
``python -m pretrain.deploy.measure``; the core reads the JSON and imports nothing from ``pretrain.deploy``)."""

from __future__ import annotations

from typing import Any

RUNTIME_NAMES = {
    "pytorch-fp32": "PyTorch fp32",
    "onnxruntime-fp32": "ONNX Runtime fp32",
    "onnxruntime-int8": "ONNX Runtime int8",
}


def _verdict(c: dict[str, Any]) -> str:
    return "**PASS**" if c.get("passed") else "**FAIL**"


def _x(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _check_lines(dep: dict[str, Any]) -> list[str]:
    checks, int8 = dep.get("checks", {}), dep.get("int8", {})
    lines = ["| check | value | tolerance | verdict |", "| --- | ---: | ---: | --- |"]
    for who in ("student", "teacher"):
        c = checks.get(f"{who}_fp32")
        if c:
            d = c.get("detail", {})
            lines.append(
                f"| {who} fp32 ONNX vs PyTorch, max abs diff (batch 1: {d.get('batch1', 0):.2g}, batch 32 of mixed "
                f"lengths: {d.get('batch32', 0):.2g}) | {c['value']:.2g} | {c['tolerance']:g} | {_verdict(c)} |"
            )
    c = int8.get("student")
    if c:
        d = c.get("detail", {})
        lines.append(
            f"| student int8 ({int8.get('mode')}) vs fp32 ONNX, retrieval recall@1 relative drop "
            f"({d.get('recall_fp32', 0):.3f} -> {d.get('recall_int8', 0):.3f} on {d.get('documents')} documents) "
            f"| {100 * c['value']:.2f}% | {100 * c['tolerance']:.1f}% | {_verdict(c)} |"
        )
    return lines


def _speed_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | runtime | batch | p50 ms | p95 ms | sequences/s | vs teacher, same runtime | vs PyTorch teacher |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {RUNTIME_NAMES.get(r['runtime'], r['runtime'])} | {r['batch']} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['throughput_seq_s']:.1f} | {_x(r.get('speedup_same_runtime'))} | "
            f"{_x(r.get('speedup_vs_pytorch_teacher'))} |"
        )
    return lines


def render_deployment_markdown(dep: dict[str, Any]) -> list[str]:
    """The lines of report.md's "Deployment" section from report.json's ``deployment`` entry: the checks with their
    verdicts, the int8 student's recall@1 and cosine, file sizes, the speed table (teacher and student in PyTorch
    fp32, ONNX Runtime fp32 and int8, with speed-ups) and its plot."""
    m, int8, files = dep.get("machine", {}), dep.get("int8", {}), dep.get("files", {})
    d = (int8.get("student") or {}).get("detail", {})
    lines = ["## Deployment (ONNX fp32 and int8)", ""]
    lines += [*_check_lines(dep), ""]
    lines.append(
        f"- int8 student: recall@1 {d.get('recall_int8', 0):.3f} (fp32 ONNX {d.get('recall_fp32', 0):.3f}; the "
        f"report's PyTorch student {int8.get('report_recall_at_1')}); cosine of its embeddings to the fp32 ones: mean "
        f"{d.get('cosine_mean', 0):.4f}, min {d.get('cosine_min', 0):.4f}, on the report's held-out halves. A FAIL "
        "means the int8 graph was written but is outside the tolerance: serve the fp32 one."
    )
    for who, f in files.items():
        lines.append(
            f"- {who} files: `{f['fp32']}` {f['fp32_bytes'] / 1e6:.1f} MB, `{f['int8']}` "
            f"{f['int8_bytes'] / 1e6:.1f} MB ({f['int8_percent']:.0f}% of fp32)."
        )
    rows = dep.get("speed") or []
    if rows:
        calls = ", ".join(sorted({f"batch {r['batch']}: {r['repeats']} timed calls" for r in rows}))
        lines += [
            f"- Speed: sequence {rows[0]['seq_len']} tokens (random ids, no padding), {m.get('threads')} threads for "
            f"every runtime (PyTorch with SDPA attention), after warm-up calls ({calls}); CPU {m.get('model')}, "
            f"{m.get('cores')} logical cores, "
            f"ISA flags {' '.join(m.get('isa') or []) or 'none found'}; graphs exported with {m.get('exporter')}. "
            f"Speed-ups are throughput ratios. Load average (1 min) at the start: {m.get('loadavg_1m', 0):.1f}; "
            "timings on a busy machine are noisy.",
            "",
        ]
        lines += _speed_lines(rows)
    if dep.get("png"):
        lines += ["", f"![deployment speed]({dep['png']})"]
    return [*lines, ""]
