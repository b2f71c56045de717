"""Dynamic int8 quantization of an exported ONNX model with ONNX Runtime (``quantize_dynamic``).

Weights become int8 (``QuantType.QInt8``) once, at conversion; activations are quantized per call from their observed
range (no calibration data needed). The file name follows sentence-transformers: ``model_qint8_<isa>.onnx`` with the
ISA of the machine that made it (:func:`pretrain.deploy.common.int8_isa`). The graph itself is the same for every
ISA (ONNX Runtime picks its kernels at load time); the name says which CPU it was checked and timed on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

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


class _Batches:
    """An ONNX Runtime ``CalibrationDataReader`` (its ``get_next`` protocol) over numpy batches (``{input name:
    int64 [batch, seq]}``), each restricted to the graph's inputs (a missing ``token_type_ids`` is zeros)."""

    def __init__(self, batches: list[dict[str, np.ndarray]], names: list[str]):
        self._feeds = [
            {n: np.asarray(b[n], np.int64) if n in b else np.zeros_like(b["input_ids"]) for n in names} for b in batches
        ]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0


def quantize_static_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    calibration: Iterable[dict[str, np.ndarray]] | None,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    op_types: Sequence[str] = ("MatMul",),
    linear_only: bool = True,
) -> Path:
    """Static int8 (``onnxruntime.quantization.quantize_static``, QDQ format, MinMax calibration): weights QInt8,
    activations QInt8 with ranges fixed from ``calibration`` (numpy batches ``{input_ids, attention_mask[,
    token_type_ids]}`` int64 ``[batch, seq]``, e.g. a few batches of the run's training sequences), only the nodes of
    ``op_types`` quantized (default MatMul; LayerNorm, Softmax and GELU stay fp32), and with ``linear_only`` only
    those with a weight (an initializer input): attention's activation x activation MatMuls stay fp32. Returns
    ``out_path``.

    Raises :class:`DeployError` when ``onnx_path`` does not exist or ``calibration`` is None or empty (static
    quantization cannot fix activation ranges without data: give calibration batches, or use the dynamic
    :func:`quantize_int8`).
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise DeployError(f"{onnx_path}: no such ONNX file; export the model first (python -m pretrain.deploy DIR)")
    batches = list(calibration) if calibration is not None else []
    if not batches:
        raise DeployError(
            f"static int8 quantization of {onnx_path} needs a calibration set (a few batches of the model's domain "
            "text) and none was given: pass --calibration FILE (one text per line), or use dynamic int8 "
            "(the default, no calibration needed)"
        )
    names = [i.name for i in ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_inputs()]
    reader = _Batches(batches, names)
    nodes = _weight_nodes(onnx_path, op_types) if linear_only else None
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        quantize_static(
            onnx_path,
            out_path,
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            nodes_to_quantize=nodes,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        logging.getLogger().setLevel(quiet)
    return out_path


def _weight_nodes(onnx_path: Path, op_types: Sequence[str]) -> list[str]:
    """Names of the nodes of ``op_types`` in the graph at ``onnx_path`` that have an initializer (a weight) input."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type in op_types and any(i in weights for i in n.input)]
