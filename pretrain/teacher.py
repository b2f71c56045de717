"""The teacher: its config and tokenizer, the checks against the shards before any weights load, loading, dtype.

:func:`preflight` checks a run's inputs without loading weights; :func:`load_teacher` loads the frozen teacher;
:func:`has_mlm_head` and :func:`tokenizer_differences` are the one definition of "has an MLM head" and "was made with
this tokenizer" for the trainer and ``python -m pretrain.evaluate`` alike.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from pretrain.families import attn_implementation, family_of, model_class
from pretrain.schema import ConfigError

if TYPE_CHECKING:
    from pretrain.config import RunConfig, TeacherConfig

# Models whose position ids start after the padding index (RoBERTa family): usable length = max_positions - pad - 1.
PADDING_OFFSET_MODELS = {
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "roberta-prelayernorm",
    "data2vec-text",
    "xmod",
}
SPECIAL_IDS = ("cls", "sep", "pad", "mask", "unk")


def has_mlm_head(config) -> bool:
    """Whether ``config.architectures`` names a class with an MLM head: ``*ForMaskedLM``, or ``BertForPreTraining``
    (MLM + next-sentence heads; loaded with ``AutoModelForMaskedLM``, which keeps the MLM head)."""
    return any(
        a.endswith("ForMaskedLM") or a == "BertForPreTraining" for a in (getattr(config, "architectures", None) or [])
    )


def max_sequence_length(config) -> int:
    """Longest sequence (tokens) the model's position embeddings allow."""
    limit = int(config.max_position_embeddings)
    if config.model_type in PADDING_OFFSET_MODELS:
        limit -= int(config.pad_token_id or 0) + 1
    return limit


def tokenizer_differences(manifest: dict, tokenizer) -> dict[str, tuple[Any, Any]]:
    """``{key: (shards' value, tokenizer's value)}`` for the vocabulary size and special token ids that differ between
    the tokenizer the shards were made with (``manifest.json`` ``tokenizer``) and ``tokenizer``; empty when equal."""
    tok = manifest.get("tokenizer", {})
    mine = {"vocab_size": len(tokenizer), **{f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in SPECIAL_IDS}}
    return {k: (tok.get(k), v) for k, v in mine.items() if tok.get(k) != v}


def describe_differences(diff: dict[str, tuple[Any, Any]]) -> str:
    """``"vocab_size 598 vs 360, ..."`` of :func:`tokenizer_differences` (shards' value vs the tokenizer's)."""
    return ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())


@dataclasses.dataclass
class Preflight:
    """What :func:`preflight` found: the teacher's local path or hub name, its config and tokenizer, whether it has an
    MLM head, and the shards' manifest."""

    teacher_path: str
    teacher_config: Any
    tokenizer: Any
    has_mlm_head: bool
    manifest: dict
    needs_logits: bool = False  # a logit term (loss.alpha_ce / alpha_mlm) is on in some stage


def preflight(cfg: RunConfig) -> Preflight:
    """Check a run's inputs (``cfg``: a validated :class:`pretrain.config.RunConfig`; its teacher, data, loss and
    train sections) without loading weights.

    Checks: the teacher resolves (``data_prep.embedded.resolve_model``) and its config and tokenizer load; a teacher
    without MLM head is not asked for ``loss.alpha_ce`` / ``loss.alpha_mlm``; the shards exist and were made with the
    teacher's tokenizer; their ``max_seq_length`` (padded to ``data.pad_to_multiple_of``) fits the teacher's position
    embeddings. Raises :class:`ConfigError` naming the key and what to do.
    """
    from transformers import AutoConfig, AutoTokenizer

    from data_prep.embedded import resolve_model
    from data_prep.errors import DataPrepError
    from data_prep.shards import load_manifest

    name = cfg.teacher.name_or_path
    try:
        path = resolve_model(name)
    except DataPrepError as e:  # an unknown embedded:NAME or a failed fetch
        raise ConfigError(f"teacher.name_or_path: {name!r}: {e}") from None
    try:
        tconf = AutoConfig.from_pretrained(path, revision=cfg.teacher.revision)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.teacher.revision)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"teacher.name_or_path: {name!r} cannot be loaded: it is not a local model directory "
            f"(config.json and tokenizer files) nor a reachable Hugging Face hub model ({first}); check "
            f"the path or name"
        ) from None
    has_mlm = has_mlm_head(tconf)
    family_of(tconf)  # a refused family (ALBERT) stops here
    from pretrain.stages import stage_losses

    needs_logits = False
    for loss in stage_losses(cfg.train, cfg.loss):  # the loss section, or each stage's weights
        loss.check_models(teacher_has_mlm_head=has_mlm, student_has_mlm_head=has_mlm, teacher_name=name)
        needs_logits = needs_logits or any(t in loss.active() for t in ("ce", "mlm"))
    if needs_logits:
        refuse_untrained_head(path, untrained_head_keys(path, tconf), name)
    try:
        manifest = load_manifest(cfg.data.dir)
    except DataPrepError as e:
        raise ConfigError(
            f"data.dir: {e}; prepare shards with `python -m data_prep prepare --tokenizer {name} ... "
            f"--output {cfg.data.dir}`"
        ) from None
    diff = tokenizer_differences(manifest, tokenizer)
    if diff:
        details = describe_differences(diff)
        raise ConfigError(
            f"data.dir: the shards in {cfg.data.dir} were made with the tokenizer "
            f"{manifest.get('tokenizer', {}).get('name_or_path')!r}, which differs from the teacher "
            f"{name!r}'s ({details}: shards vs teacher); prepare the shards with `python -m data_prep "
            f"prepare --tokenizer {name} ...`"
        )
    if int(tconf.vocab_size) < len(tokenizer):
        raise ConfigError(
            f"teacher.name_or_path: {name!r} has {tconf.vocab_size} embeddings but its tokenizer {len(tokenizer)} ids"
        )
    _check_length(cfg.data.pad_to_multiple_of, name, tconf, int(manifest["max_seq_length"]))
    return Preflight(path, tconf, tokenizer, has_mlm, manifest, needs_logits)


def _check_length(m: int, name: str, tconf, seq: int) -> None:
    """Raise :class:`ConfigError` when sequences of ``seq`` tokens, padded to a multiple of ``m``
    (``data.pad_to_multiple_of``), do not fit the position embeddings of the teacher ``name`` (config ``tconf``)."""
    limit = max_sequence_length(tconf)
    padded = seq if tconf.model_type in PADDING_OFFSET_MODELS else -(-seq // m) * m
    if padded > limit:
        raise ConfigError(
            f"data.dir: the shards' max_seq_length {seq} (padded to {padded} with "
            f"data.pad_to_multiple_of={m}) exceeds the {limit} positions of the teacher {name!r}; "
            f"prepare shards with --max-seq-length {limit - limit % m if padded != seq else limit} "
            f"or less"
        )


def untrained_head_keys(path: str, config: Any) -> list[str]:
    """The MLM head tensors the model at local directory ``path`` (config ``config``) would get newly initialised
    because its weight files (``*.safetensors``) hold no tensor of the head at all (a DeBERTa-v3 checkpoint:
    replaced-token detection, no trained MLM head). Reads the files' headers only. Empty when any head tensor is
    stored (older checkpoints name some tensors differently, e.g. LayerNorm ``gamma`` / ``beta``, which
    ``from_pretrained`` renames: :func:`load_teacher` then checks its ``missing_keys``), for a hub name (not a
    directory) or a directory without safetensors files. Tensors tied to the input embeddings do not count."""
    from pathlib import Path

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return []
    from safetensors import safe_open
    from transformers import AutoModelForMaskedLM

    stored: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            stored.update(handle.keys())
    with torch.device("meta"):
        skeleton = AutoModelForMaskedLM.from_config(config)
    tied = set(getattr(skeleton, "_tied_weights_keys", None) or {})
    prefixes = tuple(family_of(skeleton).head_prefixes(skeleton))
    if any(k.startswith(prefixes) for k in stored):
        return []
    return [k for k in skeleton.state_dict() if k.startswith(prefixes) and k not in tied]


def refuse_untrained_head(source: Any, missing: list[str], name: str) -> None:
    """Raise :class:`ConfigError` (``loss.alpha_ce``) when ``missing`` (the teacher's missing weight names: from the
    files, or ``from_pretrained``'s ``missing_keys`` when ``source`` is the loaded model) holds MLM head tensors: a
    newly initialised head would make the logit terms distil noise."""
    if isinstance(source, torch.nn.Module):
        prefixes = tuple(family_of(source).head_prefixes(source))
        missing = [k for k in missing if k.startswith(prefixes)]
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ConfigError(
            f"loss.alpha_ce: the teacher {name!r} has no trained MLM head (its checkpoint lacks {shown}, so the head "
            f"would be initialised at random, as for DeBERTa-v3's replaced-token-detection checkpoints); the logit "
            f"terms would distil noise. Set loss.alpha_ce=0 and loss.alpha_mlm=0 and use the hidden-state / "
            f"relation terms (alpha_cos, alpha_mse, alpha_att, alpha_val)"
        )


def load_teacher(teacher: TeacherConfig | RunConfig, pf: Preflight) -> torch.nn.Module:
    """The teacher model (fp32, eval mode): ``AutoModelForMaskedLM`` when :func:`has_mlm_head`, else ``AutoModel`` (a
    bare encoder such as a sentence-transformers model), from the ``teacher`` section (its revision and attention
    implementation; a whole RunConfig is accepted too, for older callers) and ``pf``, :func:`preflight`'s findings.

    A bare encoder keeps its pooler when its checkpoint has pooler weights (the student copies it, so the exported
    student's ``pooler_output`` is the teacher's and loading it warns of nothing); when the checkpoint has none the
    pooler is dropped instead of being left random."""
    from transformers import AutoModel, AutoModelForMaskedLM

    from pretrain.config import RunConfig

    section = teacher.teacher if isinstance(teacher, RunConfig) else teacher
    cls = AutoModelForMaskedLM if pf.has_mlm_head else AutoModel
    impl = attn_implementation(
        model_class(cls, pf.teacher_config),
        section.attn_implementation,
        cuda=torch.cuda.is_available(),
        who="teacher",
    )
    model, info = cls.from_pretrained(
        pf.teacher_path,
        revision=section.revision,
        dtype=torch.float32,
        attn_implementation=impl,
        output_loading_info=True,
    )
    if pf.needs_logits:
        refuse_untrained_head(model, info["missing_keys"], section.name_or_path)
    if getattr(model, "pooler", None) is not None and any(k.startswith("pooler.") for k in info["missing_keys"]):
        model.pooler = None
    return model.eval()


def teacher_dtype(teacher: TeacherConfig, deepspeed: dict[str, Any], cuda: bool) -> torch.dtype:
    """The teacher's precision: ``teacher.dtype`` of the ``teacher`` section; "auto": the half precision of the
    ``deepspeed`` section on GPU (``cuda``), fp32 on CPU."""
    from pretrain import ds_config as dsc

    if teacher.dtype != "auto":
        return getattr(torch, teacher.dtype)
    if not cuda:
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dsc.precision(deepspeed), torch.float32)
