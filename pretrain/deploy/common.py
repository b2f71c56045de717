"""What every deploy step shares: the errors, the model kinds, loading a Hugging Face folder, and the CPU's ISA.

A model folder is what ``python -m pretrain.export`` writes (``config.json``, ``model.safetensors``, tokenizer files,
and for a sentence-encoder teacher ``modules.json`` + ``1_Pooling/``). Its *kind* decides the ONNX output:

=============  =====================================  =================  ==============================
kind           ``architectures[0]`` in config.json    ONNX output        optimum class that reads it
=============  =====================================  =================  ==============================
``encoder``    ``*Model`` (BertModel, RobertaModel)   last_hidden_state  ORTModelForFeatureExtraction
``mlm``        ``*ForMaskedLM``                       logits             ORTModelForMaskedLM
``classifier`` ``*ForSequenceClassification``         logits             ORTModelForSequenceClassification
=============  =====================================  =================  ==============================
"""

from __future__ import annotations

import contextlib
import inspect
import json
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data_prep.errors import DistillError

KINDS = ("encoder", "mlm", "classifier")
OUTPUT_NAME = {"encoder": "last_hidden_state", "mlm": "logits", "classifier": "logits"}
# model types whose encoders take (input_ids, attention_mask[, token_type_ids]) and export with torch.onnx
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert")
_HEADS = {"ForMaskedLM": "mlm", "ForSequenceClassification": "classifier", "Model": "encoder"}


class DeployError(DistillError, ValueError):
    """Bad deploy input (not a model folder, an architecture ONNX export does not support, a bad option or text
    file): the message names the file / value and what to do. Exit status 2."""

    exit_code = 2


class CheckFailed(DistillError, RuntimeError):
    """A conversion was written but its accuracy check is outside tolerance (the message names the check, the number
    and the tolerance). Exit status 1."""

    exit_code = 1


def read_config(model_dir: str | Path) -> dict:
    """``model_dir/config.json`` as a dict. Raises :class:`DeployError` when the folder or file is missing or bad."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise DeployError(f"{model_dir}: no such folder; give a Hugging Face model folder (python -m pretrain.export)")
    if not path.is_file():
        raise DeployError(
            f"{model_dir}: not a Hugging Face model folder (no config.json); give the folder that "
            "`python -m pretrain.export` wrote (config.json, model.safetensors, tokenizer files)"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DeployError(f"{path}: cannot read it as JSON ({e}); re-export the model") from e
    if not isinstance(cfg, dict):
        raise DeployError(f"{path}: expected a JSON object, got {type(cfg).__name__}; re-export the model")
    return cfg


def detect_kind(model_dir: str | Path, kind: str | None = None) -> str:
    """The kind (``encoder`` / ``mlm`` / ``classifier``) of the model in ``model_dir``, from config.json's
    ``model_type`` and ``architectures[0]``; ``kind`` overrides it (``encoder`` exports the base model of any head).

    Raises :class:`DeployError` for a folder without config.json, a model type or head that is not supported
    (the message names it and lists the supported ones), or a ``kind`` the folder's head cannot give.
    """
    cfg = read_config(model_dir)
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    arch = str(archs[0]) if archs else ""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise DeployError(
            f"{model_dir}/config.json: model_type {model_type!r} (architectures {archs}) is not supported for ONNX "
            f"export; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    found = next((k for suffix, k in _HEADS.items() if arch.endswith(suffix)), None) if arch else "encoder"
    if found is None:
        raise DeployError(
            f"{model_dir}/config.json: architecture {arch!r} is not supported for ONNX export; supported heads: "
            "*Model (encoder), *ForMaskedLM (mlm), *ForSequenceClassification (classifier)"
        )
    if kind is None:
        return found
    if kind not in KINDS:
        raise DeployError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind != "encoder" and kind != found:
        raise DeployError(f"{model_dir}: kind {kind!r} asked but the folder holds {arch!r} (kind {found!r})")
    return kind


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # an unused pooler / dropped MLM head is expected here, not news
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_torch_model(model_dir: str | Path, kind: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The PyTorch model of ``model_dir`` for ``kind`` (Auto class of that head), fp32, in eval mode."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    auto = {"encoder": AutoModel, "mlm": AutoModelForMaskedLM, "classifier": AutoModelForSequenceClassification}[kind]
    with _quiet_transformers():
        model = auto.from_pretrained(str(model_dir), attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval()


def input_names(model: torch.nn.Module) -> list[str]:
    """The ONNX inputs for ``model``: input_ids, attention_mask, and token_type_ids when its forward takes them and
    its config has more than one token type (BERT: yes; RoBERTa, XLM-R: type_vocab_size 1, no; DistilBERT: no),
    as optimum's ONNX configs do."""
    names = ["input_ids", "attention_mask"]
    takes = "token_type_ids" in inspect.signature(model.forward).parameters
    if takes and getattr(getattr(model, "config", None), "type_vocab_size", 1) > 1:
        names.append("token_type_ids")
    return names


def load_tokenizer(model_dir: str | Path):
    """The folder's tokenizer (``AutoTokenizer``). Raises :class:`DeployError` when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise DeployError(f"{model_dir}: cannot load its tokenizer ({e}); export the model with its tokenizer") from e


def cpu_info() -> dict[str, Any]:
    """``{"model": CPU model name, "isa": [SIMD flags that matter for int8], "cores": logical cores}`` from
    /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    import os

    name, flags = "", set[str]()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm")
    return {
        "model": name or platform.processor() or platform.machine(),
        "isa": [f for f in wanted if f in flags],
        "cores": os.cpu_count(),
    }


def int8_isa(info: dict[str, Any] | None = None) -> str:
    """The sentence-transformers ISA tag for this CPU: ``avx512_vnni``, ``avx512``, ``avx2`` or ``arm64`` (the names
    of its ``onnx/model_qint8_<isa>.onnx`` files), from :func:`cpu_info`'s flags; ``avx2`` when none match."""
    info = info or cpu_info()
    isa = info["isa"]
    if platform.machine().lower() in ("aarch64", "arm64") or "asimd" in isa:
        return "arm64"
    if "avx512_vnni" in isa:
        return "avx512_vnni"
    if "avx512f" in isa:
        return "avx512"
    return "avx2"
