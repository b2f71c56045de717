"""Dynamic int8 quantization of an exported ONNX model with ONNX Runtime (``quantize_dynamic``).

Weights become int8 (``QuantType.QInt8``) once, at conversion; activations are quantized per call from their observed
range (no calibration data needed). The file name follows sentence-transformers: ``model_qint8_<isa>.onnx`` with the
ISA of the machine that made it (:func:`pretrain.deploy.common.int8_isa`). The graph itself is the same for every
ISA (ONNX Runtime picks its kernels at load time); the name says which CPU it was checked and timed on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pretrain.deploy.common import DeployError, int8_isa

# quantize_dynamic's default op types (IntegerOps registry) less Gather, the embedding lookup
_OPS_WITHOUT_GATHER = ["MatMul", "Attention", "LSTM", "Conv", "EmbedLayerNormalization", "Transpose"]


def int8_filename(isa: str | None = None) -> str:
    """``model_qint8_<isa>.onnx`` (``isa`` defaults to this CPU's, :func:`pretrain.deploy.common.int8_isa`)."""
    return f"model_qint8_{isa or int8_isa()}.onnx"


def quantize_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    *,
    per_channel: bool = False,
    reduce_range: bool = False,
    exclude_embeddings: bool = False,
) -> Path:
    """Quantize the fp32 ONNX model ``onnx_path`` to int8 weights at ``out_path`` (``quantize_dynamic``, weight type
    QInt8). Returns ``out_path``.

    ``per_channel``: one scale per output channel of each weight (more accurate, slightly larger); ``reduce_range``:
    7-bit weights, for CPUs without VNNI where the 8-bit u8*s8 product can saturate (AVX2); ``exclude_embeddings``:
    keep the embedding ``Gather`` in fp32 (the word-embedding table is then the bulk of a small model's file).
    Raises :class:`DeployError` when ``onnx_path`` does not exist.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise DeployError(f"{onnx_path}: no such ONNX file; export the model first (python -m pretrain.deploy DIR)")
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint on every call
    try:
        quantize_dynamic(
            onnx_path,
            out_path,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=reduce_range,
            op_types_to_quantize=_OPS_WITHOUT_GATHER if exclude_embeddings else None,
        )
    finally:
        logging.getLogger().setLevel(quiet)
    return out_path
