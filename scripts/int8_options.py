"""Measure int8 options on a run's sentence-encoder student (docs/deployment.md, "int8 options on the demo student").

    PYTHONPATH=. python scripts/int8_options.py runs/demo runs/data/minilm-128 /tmp/int8-options [VARIANT ...]

Exports RUN/student to OUT/model.onnx (TorchScript exporter), then for each variant (all, or those named) writes an
int8 graph and prints one JSON line: size, recall@1 on the report's held-out halves, relative drop against the fp32
graph, cosine of the int8 to the fp32 embeddings (mean / min), seconds to quantize and to embed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pretrain.deploy.onnx_export import export_onnx
from pretrain.deploy.quantize import quantize_int8, quantize_static_int8
from pretrain.deploy.retrieval import calibration_batches, onnx_embeddings, recall_at_1, run_halves
from pretrain.deploy.verify import OnnxRunner


def main(run: Path, data: str, out: Path, only: list[str]) -> None:
    """Print the fp32 recall, then one JSON line per int8 variant."""
    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / "model.onnx"
    if not fp32.exists():
        export_onnx(run / "student", out, exporter="torchscript")
    seqs, pad = run_halves(data, json.loads((run / "report.json").read_text())["meta"]["retrieval"])

    def emb(path: Path):
        return onnx_embeddings(OnnxRunner(path, threads=2), seqs, pad)

    e32 = emb(fp32)
    r32 = recall_at_1(e32)
    print(f"fp32 recall@1 {r32:.4f}", flush=True)
    calib = calibration_batches(data)
    variants = {
        "dynamic": lambda o: quantize_int8(fp32, o),
        "dynamic per-channel": lambda o: quantize_int8(fp32, o, per_channel=True),
        "dynamic per-channel reduce-range": lambda o: quantize_int8(fp32, o, per_channel=True, reduce_range=True),
        "dynamic per-channel fp32-embeddings": lambda o: quantize_int8(
            fp32, o, per_channel=True, exclude_embeddings=True
        ),
        "dynamic per-channel fp32-embeddings reduce-range": lambda o: quantize_int8(
            fp32, o, per_channel=True, exclude_embeddings=True, reduce_range=True
        ),
        "static per-channel MatMul": lambda o: quantize_static_int8(fp32, o, calib, linear_only=False),
        "static per-tensor MatMul": lambda o: quantize_static_int8(
            fp32, o, calib, per_channel=False, linear_only=False
        ),
        "static per-channel linear-only": lambda o: quantize_static_int8(fp32, o, calib),
    }
    for i, (name, make) in enumerate(variants.items()):
        if only and name not in only:
            continue
        path, t0 = out / f"v{i}.onnx", time.perf_counter()
        make(path)
        t1 = time.perf_counter()
        e8 = emb(path)
        r8, cos = recall_at_1(e8), (e8 * e32).sum(1)
        row = {"variant": name, "mb": round(path.stat().st_size / 1e6, 1), "recall": r8, "drop": (r32 - r8) / r32}
        row |= {"cos_mean": round(float(cos.mean()), 5), "cos_min": round(float(cos.min()), 4)}
        row |= {"quant_s": round(t1 - t0, 1), "embed_s": round(time.perf_counter() - t1, 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
