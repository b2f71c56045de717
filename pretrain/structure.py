"""Where a BERT-like Hugging Face model keeps its parts, found by structure: its config, its block list, its encoder.

Read by student building (:mod:`pretrain.student`), pruning (:mod:`pretrain.prune`), distillation
(:mod:`pretrain.distill`) and validation. It imports no other ``pretrain`` module, so each of them can import it
without an import cycle. Models are found by structure, not by class name, so BERT, RoBERTa, XLM-R, ELECTRA,
DistilBERT and other BERT-like encoders work, with or without an MLM head.
"""

from __future__ import annotations

import copy
import inspect
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # transformers loads in seconds; the config CLI imports this module without needing it
    from transformers import PreTrainedConfig, PreTrainedModel


def pretrained(model: nn.Module) -> PreTrainedModel:
    """``model`` as a Hugging Face ``PreTrainedModel`` (narrowed for the type checker). Raises ``TypeError`` for
    another module (students are built from, and as, Hugging Face models)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel (from_pretrained / AutoModel)")
    return model


def model_config(model: nn.Module) -> PreTrainedConfig:
    """The Hugging Face config of ``model`` (``model.config``, typed). Raises ``TypeError`` when it has none."""
    from transformers import PreTrainedConfig

    config = getattr(model, "config", None)
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(
            f"{type(model).__name__} has no Hugging Face config (model.config); is it a transformers model?"
        )
    return config


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The encoder's list of transformer blocks, found by structure.

    Returns ``(qualified name, module list)``: the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries of one
    class holding the most parameters (``bert.encoder.layer``, ``roberta.encoder.layer``,
    ``distilbert.transformer.layer``, ...). Raises ``ValueError`` when there is none, ``TypeError`` for a model
    without a Hugging Face config.
    """
    n = model_config(model).num_hidden_layers
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n > 0 and len({type(m) for m in mod}) == 1:
            found.append((sum(p.numel() for p in mod.parameters()), name, mod))
    if not found:
        raise ValueError(
            f"{type(model).__name__}: no nn.ModuleList of {n} transformer blocks found; is this a BERT-like encoder?"
        )
    _, name, mod = max(found, key=lambda x: x[0])
    return name, mod


def base_model(model: nn.Module) -> nn.Module:
    """The encoder without task head (``model.base_model`` of Hugging Face models: BertModel, RobertaModel, ...)."""
    base = getattr(model, "base_model", model)
    return base if isinstance(base, nn.Module) else model


def find_module(module: nn.Module, path: str) -> nn.Module | None:
    """The submodule at dotted ``path`` (``"embeddings.LayerNorm"``), or None when a step is missing or not a
    module."""
    found: object = module
    for part in path.split("."):
        found = getattr(found, part, None)
        if not isinstance(found, nn.Module):
            return None
    return found if isinstance(found, nn.Module) else None


def require_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model``; ``ValueError`` naming it when it is missing or not a module."""
    found = find_module(model, name)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no module {name!r}")
    return found


def new_like(
    cls: type[PreTrainedModel], config: PreTrainedConfig, like: nn.Module | None = None, attn: str | None = None
) -> PreTrainedModel:
    """``cls(config)`` (on a copy of ``config``) with attention kernel ``attn`` ("eager", "sdpa",
    "flash_attention_2"; the caller checked the class supports it) or, when None, SDPA where the class supports it;
    keeps ``add_pooling_layer`` as in ``like`` (an encoder with or without pooler) when the class takes it."""
    config = copy.deepcopy(config)
    if attn is not None:
        config._attn_implementation = attn
    elif getattr(cls, "_supports_sdpa", False):
        config._attn_implementation = "sdpa"
    kwargs = {}
    if like is not None and "add_pooling_layer" in inspect.signature(cls).parameters:
        kwargs["add_pooling_layer"] = getattr(like, "pooler", None) is not None
    return cls(config, **kwargs)
