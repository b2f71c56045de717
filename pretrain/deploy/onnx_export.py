"""Export a Hugging Face model folder to ONNX: ``FOLDER/onnx/model.onnx`` with dynamic batch and sequence axes.

The layout is the one sentence-transformers' ONNX backend and optimum's ``ORTModelFor*`` classes read: inputs
``input_ids``, ``attention_mask`` (+ ``token_type_ids`` for BERT), int64, shape ``[batch_size, sequence_length]``;
output ``last_hidden_state`` (float32 ``[batch_size, sequence_length, hidden]``) for an encoder, ``logits`` for an MLM
(``[batch_size, sequence_length, vocab]``) or a classifier (``[batch_size, num_labels]``).

The exporter is ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), the supported path since torch
2.9; the TorchScript exporter (``exporter="torchscript"``) is deprecated but several times faster to run (about 1.5 s
against 11 s for a tiny BERT here) and is kept as an option. Both agree with PyTorch to ~1e-6 (docs/deployment.md).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from pretrain.deploy.common import OUTPUT_NAME, DeployError, detect_kind, input_names, load_torch_model

EXPORTERS = ("dynamo", "torchscript")
OPSET = 18


class _Wrapped(torch.nn.Module):
    """``model`` with positional ONNX inputs and one tensor out (``output``), so the graph has exactly the names
    optimum expects."""

    def __init__(self, model: torch.nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        return self.model(**kw, return_dict=True)[self.output]


def dummy_inputs(names: list[str], vocab_size: int, batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    """Example inputs for tracing: random ids in ``[5, vocab_size)`` (int64 ``[batch, seq]``), the last row padded
    to half length (so the mask path is traced), token types 0."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, max(vocab_size, 6), (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {k: out[k] for k in names}


def _export(wrapped: torch.nn.Module, args: tuple, out_path: Path, names: list[str], kind: str, exporter: str) -> None:
    output = OUTPUT_NAME[kind]
    if exporter == "dynamo":
        dims = {0: torch.export.Dim("batch_size"), 1: torch.export.Dim("sequence_length")}
        torch.onnx.export(
            wrapped,
            args,
            str(out_path),
            input_names=names,
            output_names=[output],
            dynamic_shapes=dict.fromkeys(names, dims),
            opset_version=OPSET,
            external_data=False,
            dynamo=True,
            verbose=False,
        )
        return
    token_axes = {0: "batch_size", 1: "sequence_length"}
    out_axes = {0: "batch_size"} if kind == "classifier" else token_axes  # classifier logits: [batch, labels]
    torch.onnx.export(
        wrapped,
        args,
        str(out_path),
        input_names=names,
        output_names=[output],
        dynamic_axes={**dict.fromkeys(names, token_axes), output: out_axes},
        opset_version=17,
        dynamo=False,
    )


def export_model(model: torch.nn.Module, kind: str, out_path: str | Path, *, exporter: str = "dynamo") -> Path:
    """Export the eval-mode PyTorch ``model`` of ``kind`` to the single ONNX file ``out_path`` (weights inside, not
    external data; a model over 2 GiB would need external data and is not a student). Returns ``out_path``.

    The module is put back in eval mode afterwards (an export can leave it in train mode). Raises
    :class:`DeployError` for an unknown ``exporter``.
    """
    if exporter not in EXPORTERS:
        raise DeployError(f"exporter {exporter!r} is not one of {', '.join(EXPORTERS)}")
    names = input_names(model)
    cfg = getattr(model, "config", None)
    args = tuple(dummy_inputs(names, int(getattr(cfg, "vocab_size", 100))).values())
    wrapped = _Wrapped(model, OUTPUT_NAME[kind]).eval()
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" x4
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporters' deprecation / tracer warnings are not for the user
            _export(wrapped, args, Path(out_path), names, kind, exporter)
    finally:
        registration.setLevel(level)
        model.eval()  # an export can leave the module in train mode (dropout on): compare only after this
    return Path(out_path)


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    kind: str | None = None,
    exporter: str = "dynamo",
    attn_implementation: str = "sdpa",
) -> Path:
    """Export the Hugging Face model folder ``model_dir`` to ``out_dir/model.onnx`` (``out_dir`` is created; the
    caller makes it atomic, see :func:`pretrain.deploy.cli.deploy`). ``kind`` is detected from config.json when None
    (:func:`pretrain.deploy.common.detect_kind`). Returns the path of model.onnx.

    Raises :class:`DeployError` for a folder that is not a model or an unsupported architecture.
    """
    kind = detect_kind(model_dir, kind)
    model = load_torch_model(model_dir, kind, attn_implementation)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return export_model(model, kind, out_dir / "model.onnx", exporter=exporter)
