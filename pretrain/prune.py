"""Width pruning of a teacher into a narrower student by activation importance (``student.init="prune"``).

The method is Minitron's (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation",
sec. 2.2 "Importance Analysis", activation-based, single shot): run the teacher on a small calibration sample of the
run's own training shards and score

- every attention head by the L2 norm of its attention output (per token, over the head's ``head_dim`` channels,
  before the output projection: the input of ``attention.output.dense``);
- every feed-forward neuron by its mean absolute activation after the activation function (the output of the
  ``intermediate`` module, i.e. ``act(x W1^T + b1)``);
- every hidden (embedding) channel by the magnitude of the LayerNorm outputs, accumulated over the LayerNorms the
  student keeps (the embeddings' LayerNorm and both LayerNorms of every mapped layer).

Aggregation over tokens and sequences: each per-token magnitude is averaged over the real (non-pad) tokens of its
sequence (sequence aggregation: mean), then over the sequences of the sample (batch aggregation: mean). Minitron's
formulas sum over batch and sequence (``sum_{B,S}``); for the packed shards, where nearly every sequence has the same
length, the means rank exactly as the sums. Minitron sums the signed LayerNorm outputs for the embedding channels; we
take their absolute value, so that a channel with large outputs of both signs does not cancel out (a zeroed channel
still scores 0).

Then the top heads / neurons / channels are kept, in their original order (sorted indices; ties go to the lower
index), and every tensor is sliced consistently: the embeddings (word, position, token type), every LayerNorm, Q/K/V
(rows of the kept heads, columns of the kept channels), the attention output (rows: channels; columns: heads), the
feed-forward (neurons x channels), the MLM head's transform and LayerNorm, the tied decoder (its input dimension:
the tie with the word embeddings stays) and the pooler. Depth and width combine: heads and neurons are scored and
kept per mapped layer (``student.layers``).

Why the slicing is done here rather than with transformers' ``prune_heads``: ``prune_heads`` (removed from the BERT
models in transformers 5) kept the hidden size and stored the pruned heads in ``config.pruned_heads``, so a student
with fewer channels could not be expressed with it, and the heads per layer would differ from
``num_attention_heads``. Slicing whole heads uniformly gives a standard config (``hidden_size``,
``num_attention_heads``, ``intermediate_size`` changed, the teacher's ``head_dim`` kept), so the exported student
loads with ``from_pretrained`` without custom code.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pretrain.families import BERT_PRUNE, PruneLayout, family_of, student_attn_implementation
from pretrain.schema import ConfigError
from pretrain.structure import base_model, find_module, model_config, new_like

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle
    from transformers import PreTrainedConfig, PreTrainedModel

Batch = dict[str, torch.Tensor]  # {"input_ids", "attention_mask"}: int64 [B, L]

METHOD = (
    "Minitron activation importance (Muralidharan et al. 2024, sec. 2.2): heads by the L2 norm of their "
    "attention output, neurons by mean |activation| after the activation function, channels by mean "
    "|LayerNorm output| summed over the embeddings' and the mapped layers' LayerNorms; per-token values "
    "averaged over each sequence's real tokens, then over the sequences"
)

# Axis roles of each tensor, by name (first match wins). H: hidden channels; A: attention channels (kept heads x
# head_dim) of the tensor's layer; F: feed-forward neurons of the tensor's layer; None: kept whole (vocabulary,
# positions, token types).
RULES: tuple[tuple[re.Pattern[str], tuple[str | None, ...]], ...] = tuple(
    (re.compile(p), roles)
    for p, roles in (
        (r"\.attention\.self\.(query|key|value)\.weight$", ("A", "H")),
        (r"\.attention\.self\.(query|key|value)\.bias$", ("A",)),
        (r"\.attention\.output\.dense\.weight$", ("H", "A")),
        (r"\.attention\.output\.dense\.bias$", ("H",)),
        (r"\.intermediate\.dense\.weight$", ("F", "H")),
        (r"\.intermediate\.dense\.bias$", ("F",)),
        (r"\.output\.dense\.weight$", ("H", "F")),
        (r"\.output\.dense\.bias$", ("H",)),
        (r"(LayerNorm|layer_norm)\.(weight|bias)$", ("H",)),
        (r"_embeddings\.weight$", (None, "H")),
        (r"(^|\.)pooler\.dense\.weight$", ("H", "H")),
        (r"(^|\.)pooler\.dense\.bias$", ("H",)),
        (r"(transform\.dense|lm_head\.dense)\.weight$", ("H", "H")),
        (r"(transform\.dense|lm_head\.dense)\.bias$", ("H",)),
        (r"decoder\.weight$", (None, "H")),
        (r"(decoder\.bias|predictions\.bias|lm_head\.bias)$", (None,)),
    )
)


# ----------------------------------------------------------------------------------------------------------------
# Calibration sample


def calibration_batches(
    data_dir: str | Path,
    *,
    n: int,
    seed: int,
    pad_id: int | None = None,
    batch_size: int = 32,
    multiple: int = 8,
    device: torch.device | str | None = None,
) -> list[Batch]:
    """The calibration sample: ``n`` sequences of the train split of ``data_dir``, drawn without replacement from
    ``seed`` (``numpy.random.default_rng(seed)``; all of them when the split has fewer), in shard order, collated
    into micro-batches of ``batch_size`` (right-padded with ``pad_id``, by default the shards' tokenizer's pad id from
    manifest.json, to a multiple of ``multiple``).

    The same on every rank (seeded and read from the shards). Returns a list of ``{"input_ids": int64 [B, L],
    "attention_mask": int64 [B, L]}`` on ``device`` (CPU by default). Raises :class:`ConfigError`:
    ``student.calibration_sequences`` when ``n < 1``, ``data.dir`` (with what to do) when the directory, its
    manifest or its train split is missing or empty.
    """
    from pretrain.data import collate, open_split

    if n < 1:
        raise ConfigError(f"student.calibration_sequences: {n} must be >= 1 (the pruning importance needs a sample)")
    try:
        train = open_split(data_dir, "train")
    except ConfigError as e:
        raise ConfigError(
            f"{e} (student.init='prune' draws its calibration sample of student.calibration_sequences "
            f"sequences from this split)"
        ) from None
    if pad_id is None:
        pad_id = train.manifest.get("tokenizer", {}).get("pad_token_id")
        pad_id = 0 if pad_id is None else int(pad_id)  # padding is masked out either way
    total = len(train)
    rng = np.random.default_rng(seed)
    pick = np.arange(total) if n >= total else np.sort(rng.choice(total, size=n, replace=False))
    seqs = [train[int(i)] for i in pick]
    out = []
    for start in range(0, len(seqs), batch_size):
        batch = collate(seqs[start : start + batch_size], pad_id, multiple)
        out.append({k: v.to(device) if device is not None else v for k, v in batch.items()})
    return out


def _sample_digest(batches: Sequence[Batch]) -> tuple[int, int, str]:
    """(sequences, real tokens, sha256 of the real token ids in order) of a calibration sample."""
    h, n_seq, n_tok = hashlib.sha256(), 0, 0
    for b in batches:
        ids, mask = b["input_ids"].cpu(), b["attention_mask"].cpu().bool()
        for row, m in zip(ids, mask, strict=False):
            h.update(row[m].numpy().astype(np.int64).tobytes())
        n_seq += ids.shape[0]
        n_tok += int(mask.sum())
    return n_seq, n_tok, h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Structure


def block_parts(layer: nn.Module, layout: PruneLayout = BERT_PRUNE) -> dict[str, Any]:
    """The modules of one transformer block that pruning reads, by the family's ``layout``
    (:class:`pretrain.families.PruneLayout`; BERT's by default): ``heads_in``, ``neurons_in`` (modules) and
    ``norms`` (the block's norms, ``nn.Identity`` left out). Raises :class:`ConfigError` (``student.init``) when
    the block lacks a module of the layout."""
    missing = [p for p in (*layout.required, layout.heads_in, layout.neurons_in) if find_module(layer, p) is None]
    if missing:
        raise ConfigError(
            f"student.init: 'prune' needs the block layout {list(layout.required)}; "
            f"{type(layer).__name__} has no {missing}. Use student.init='random' for this teacher"
        )
    norms = [find_module(layer, p) for p in layout.norms]
    return {
        "heads_in": find_module(layer, layout.heads_in),
        "neurons_in": find_module(layer, layout.neurons_in),
        "norms": [m for m in norms if m is not None and not isinstance(m, nn.Identity)],
    }


def _check_prunable(tc: PreTrainedConfig) -> None:
    """Refuse a teacher whose config pruning cannot express: ``embedding_size != hidden_size`` (ELECTRA-small
    style), heads already pruned (``config.pruned_heads``) or DeBERTa-v2's conv layer grouped (``conv_groups > 1``).
    Raises :class:`ConfigError` (``student.init``)."""
    t_hidden = tc.hidden_size
    if getattr(tc, "embedding_size", t_hidden) not in (None, t_hidden):
        raise ConfigError(
            f"student.init: 'prune' needs embedding_size == hidden_size; the teacher has "
            f"embedding_size {tc.embedding_size}, hidden_size {t_hidden}. Use student.init='random'"
        )
    groups = getattr(tc, "conv_groups", 1) if getattr(tc, "conv_kernel_size", 0) else 1
    if groups != 1:
        raise ConfigError(
            f"student.init: 'prune' cannot cut the hidden channels of the teacher's grouped conv layer "
            f"(encoder.conv, conv_groups={groups}): a kept channel's inputs span its group. Use student.init='random'"
        )
    if any(getattr(tc, "pruned_heads", None) or {}):
        raise ConfigError(
            "student.init: the teacher already has pruned heads (config.pruned_heads): its layers have "
            "different head counts, which 'prune' does not read. Use student.init='random'"
        )


def _target_heads(hidden: int, num_attention_heads: int | None, t_hidden: int, t_heads: int) -> int:
    """The student's head count for a hidden size of ``hidden`` (None = ``hidden // head_dim``), checked against
    the teacher's ``t_heads`` heads of ``head_dim = t_hidden // t_heads`` channels. Raises :class:`ConfigError`
    (``student.hidden_size``, ``student.num_attention_heads``) as :func:`resolve_targets` says."""
    head_dim = t_hidden // t_heads
    if num_attention_heads is None:
        if hidden % head_dim:
            raise ConfigError(
                f"student.hidden_size: {hidden} is not a multiple of the teacher's head size "
                f"{head_dim} ({t_hidden} / {t_heads} heads); pruning keeps whole heads of that size, so "
                f"the student's hidden size must be a multiple of it"
            )
        heads = hidden // head_dim
    else:
        heads = num_attention_heads
    if heads > t_heads:
        raise ConfigError(
            f"student.num_attention_heads: {heads} is more than the teacher's {t_heads} heads; pruning "
            f"can only remove heads"
        )
    if hidden % heads:
        raise ConfigError(f"student.num_attention_heads: {heads} does not divide student.hidden_size={hidden}")
    if hidden // heads != head_dim:
        raise ConfigError(
            f"student.num_attention_heads: {heads} heads of {hidden} channels make a head size of {hidden // heads}, "
            f"the teacher's is {head_dim}; pruning keeps whole teacher heads and a standard config has head size = "
            f"hidden_size / num_attention_heads, so set student.num_attention_heads={hidden // head_dim} "
            f"(student.hidden_size / {head_dim})"
            + ("" if hidden % head_dim == 0 else f" with a student.hidden_size that is a multiple of {head_dim}")
        )
    return heads


def resolve_targets(
    teacher_config: PreTrainedConfig,
    hidden_size: int | None,
    num_attention_heads: int | None,
    intermediate_size: int | None,
) -> tuple[int, int, int]:
    """The student's ``(hidden_size, num_attention_heads, intermediate_size)`` for pruning a teacher with
    ``teacher_config``; None = the teacher's hidden size / ``hidden_size // head_dim`` / the teacher's ratio of
    intermediate to hidden size.

    Pruning keeps whole teacher heads, and a standard Hugging Face config has ``head_dim = hidden_size /
    num_attention_heads``, so the student's head size must equal the teacher's. Raises :class:`ConfigError` naming
    the key, before any work: a target larger than the teacher's (``student.hidden_size``,
    ``student.num_attention_heads``, ``student.intermediate_size``), a hidden size not divisible by the heads, a head
    size different from the teacher's, a teacher with ``embedding_size != hidden_size`` (ELECTRA-small style) or with
    heads already pruned (``config.pruned_heads``).
    """
    tc = teacher_config
    t_hidden, t_heads, t_inter = tc.hidden_size, tc.num_attention_heads, tc.intermediate_size
    _check_prunable(tc)
    hidden = hidden_size or t_hidden
    if hidden > t_hidden:
        raise ConfigError(
            f"student.hidden_size: {hidden} is larger than the teacher's {t_hidden}; pruning can only remove channels"
        )
    heads = _target_heads(hidden, num_attention_heads, t_hidden, t_heads)
    inter = intermediate_size or round(t_inter * hidden / t_hidden)
    if inter > t_inter:
        raise ConfigError(
            f"student.intermediate_size: {inter} is larger than the teacher's {t_inter}; pruning can "
            f"only remove neurons"
        )
    return hidden, heads, inter


# ----------------------------------------------------------------------------------------------------------------
# Importance


@dataclasses.dataclass
class Importance:
    """Activation importance of a teacher on a calibration sample (fp32 CPU tensors, larger = more important).

    ``heads[t]``: [num_attention_heads] of teacher layer t (0-based); ``neurons[t]``: [intermediate_size];
    ``channels``: [hidden_size], summed over the LayerNorms read; ``sequences`` / ``tokens``: the sample's size
    (real tokens); ``sha256``: of the sample's token ids (the record names the sample it came from).
    """

    heads: dict[int, torch.Tensor]
    neurons: dict[int, torch.Tensor]
    channels: torch.Tensor
    sequences: int
    tokens: int
    sha256: str


def _seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over real tokens: x [B, L, ...], mask float [B, L] -> [B, ...] (fp32)."""
    m = mask.reshape(*mask.shape, *([1] * (x.dim() - 2)))
    return (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclasses.dataclass
class _Sums:
    """What the importance hooks accumulate: per teacher layer t, ``heads[t]`` [num_attention_heads] and
    ``neurons[t]`` [intermediate_size], and ``channels`` [hidden_size], each the sum over the sequences run so far of
    the per-sequence means (fp32, CPU); ``mask``: float [B, L] of the micro-batch being run."""

    heads: dict[int, torch.Tensor]
    neurons: dict[int, torch.Tensor]
    channels: torch.Tensor
    mask: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0))


def _check_sample(batches: Sequence[Batch]) -> None:
    """Raise :class:`ConfigError` (``student.calibration_sequences``) for a sample without any real token."""
    if not batches or sum(int(b["attention_mask"].sum()) for b in batches) == 0:
        raise ConfigError(
            "student.calibration_sequences: the calibration sample is empty (no sequence with a real "
            "token); pruning needs at least one"
        )


def _embeddings_layer_norm(teacher: nn.Module, layout: PruneLayout = BERT_PRUNE) -> nn.Module:
    """The teacher's embeddings norm (``layout.embeddings_norm``: ``embeddings.LayerNorm``, ModernBERT's
    ``embeddings.norm``); :class:`ConfigError` (``student.init``) when it has none."""
    emb_ln = find_module(base_model(teacher), layout.embeddings_norm)
    if emb_ln is None:
        raise ConfigError(
            f"student.init: 'prune' needs the embeddings' norm ({layout.embeddings_norm}); "
            f"{type(teacher).__name__} has none. Use student.init='random'"
        )
    return emb_ln


def _add(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target += value`` summed over the sequences (value [B, ...], target [...] on the CPU)."""
    target += value.sum(0).cpu()


def _hook_importance(
    emb_ln: nn.Module, parts: dict[int, dict[str, Any]], sums: _Sums, n_heads: int, head_dim: int
) -> list[RemovableHandle]:
    """Register the forward hooks that add each micro-batch's per-sequence means to ``sums``: the heads' output
    norms (input of ``heads_in``, the attention output projection), |neurons| (input of ``neurons_in``, the
    feed-forward output projection: BERT's ``intermediate`` output, ModernBERT's ``act(input) * gate``) and |norm
    outputs| (the embeddings' and the block norms of every block in ``parts``, teacher layer ->
    :func:`block_parts`). Returns the handles, in the order registered."""

    def on_heads(t: int):
        def hook(_m, args):
            x = args[0]  # [B, L, heads * head_dim]: the heads' outputs, concatenated, before the projection
            norms = x.float().reshape(*x.shape[:2], n_heads, head_dim).norm(dim=-1)  # [B, L, heads]
            _add(sums.heads[t], _seq_mean(norms, sums.mask))

        return hook

    def on_neurons(t: int):
        def hook(_m, args):  # [B, L, intermediate] after the activation function (and the gate)
            _add(sums.neurons[t], _seq_mean(args[0].abs(), sums.mask))

        return hook

    def on_ln(_m, _args, out):  # [B, L, hidden]
        _add(sums.channels, _seq_mean(out.abs(), sums.mask))

    handles = [emb_ln.register_forward_hook(on_ln)]
    for t, p in parts.items():
        handles.append(p["heads_in"].register_forward_pre_hook(on_heads(t)))
        handles.append(p["neurons_in"].register_forward_pre_hook(on_neurons(t)))
        handles += [norm.register_forward_hook(on_ln) for norm in p["norms"]]
    return handles


def _run_sample(teacher: nn.Module, batches: Sequence[Batch], sums: _Sums, handles: list[RemovableHandle]) -> None:
    """Run the teacher's encoder over ``batches`` in eval mode, on the batches' device (the teacher is moved there
    and back; its training mode is restored), setting ``sums.mask`` per micro-batch; removes ``handles`` after."""
    was_training = teacher.training
    home = next(teacher.parameters()).device
    device = batches[0]["input_ids"].device
    teacher.eval().to(device)
    try:
        encoder = base_model(teacher)
        for b in batches:
            sums.mask = b["attention_mask"].to(device).float()
            encoder(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
    finally:
        for h in handles:
            h.remove()
        teacher.to(home).train(was_training)


@torch.no_grad()
def compute_importance(teacher: nn.Module, batches: Sequence[Batch], layers: Sequence[int]) -> Importance:
    """Score the heads, neurons (of teacher ``layers``, 0-based) and hidden channels of ``teacher`` on ``batches``.

    Args:
        teacher: a Hugging Face BERT-like encoder (any head) with BERT's block layout (:func:`block_parts`). It runs
            in eval mode (dropout off) under ``no_grad``, on the device of the batches (moved there for the forwards
            and back afterwards); its training mode is restored.
        batches: ``{"input_ids", "attention_mask"}`` int64 [B, L] (:func:`calibration_batches`).
        layers: the teacher layers whose heads and neurons are scored and whose LayerNorms count for the channels
            (the student's layer map).

    Returns :class:`Importance` (see the module docstring for the measures and the aggregation: mean over each
    sequence's real tokens, then mean over sequences). Deterministic for a given sample on a given device. Raises
    :class:`ConfigError` (``student.calibration_sequences``) for an empty sample, (``student.init``) for a teacher
    without BERT's block layout.
    """
    return _compute_importance(teacher, batches, layers)


def _compute_importance(teacher: nn.Module, batches: Sequence[Batch], layers: Sequence[int]) -> Importance:
    # undecorated: mutmut does not mutate decorated functions
    _check_sample(batches)
    tc = model_config(teacher)
    n_heads, head_dim = tc.num_attention_heads, tc.hidden_size // tc.num_attention_heads
    family = family_of(teacher)
    layout = family.prune_layout or BERT_PRUNE
    _, blocks = family.layer_list(teacher)
    emb_ln = _embeddings_layer_norm(teacher, layout)
    parts = {t: block_parts(blocks[t], layout) for t in layers}
    sums = _Sums(
        heads={t: torch.zeros(n_heads) for t in layers},
        neurons={t: torch.zeros(tc.intermediate_size) for t in layers},
        channels=torch.zeros(tc.hidden_size),
    )
    handles = _hook_importance(emb_ln, parts, sums, n_heads, head_dim)
    _run_sample(teacher, batches, sums, handles)
    n_seq, n_tok, digest = _sample_digest(batches)
    scale = 1.0 / n_seq
    return Importance(
        heads={t: v * scale for t, v in sums.heads.items()},
        neurons={t: v * scale for t, v in sums.neurons.items()},
        channels=sums.channels * scale,
        sequences=n_seq,
        tokens=n_tok,
        sha256=digest,
    )


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest ``scores`` (1-D), in ascending index order (the original order); ties go to the
    lower index (stable sort), so the choice is deterministic."""
    order = torch.argsort(-scores.double(), stable=True)
    return sorted(int(i) for i in order[:k])


@dataclasses.dataclass
class Selection:
    """What a pruned student keeps, as teacher indices in the original order: ``channels`` (hidden); per student
    layer i (teacher layer ``layer_map[i]``): ``heads[i]`` and ``neurons[i]``."""

    layer_map: list[int]
    channels: list[int]
    heads: list[list[int]]
    neurons: list[list[int]]

    def attention_channels(self, i: int, head_dim: int) -> list[int]:
        """The Q/K/V output channels of student layer i: the kept heads' ``head_dim`` channels each, in order."""
        return [h * head_dim + j for h in self.heads[i] for j in range(head_dim)]


def select(
    importance: Importance,
    layer_map: Sequence[int],
    *,
    hidden_size: int,
    num_attention_heads: int,
    intermediate_size: int,
) -> Selection:
    """Keep the top ``hidden_size`` channels, and in each mapped layer the top ``num_attention_heads`` heads and
    ``intermediate_size`` neurons (:func:`top_k`: sorted indices, deterministic)."""
    return Selection(
        layer_map=list(layer_map),
        channels=top_k(importance.channels, hidden_size),
        heads=[top_k(importance.heads[t], num_attention_heads) for t in layer_map],
        neurons=[top_k(importance.neurons[t], intermediate_size) for t in layer_map],
    )


# ----------------------------------------------------------------------------------------------------------------
# Slicing


def roles_of(key: str, layout: PruneLayout = BERT_PRUNE) -> tuple[str | None, ...] | None:
    """The axis roles of a state-dict tensor: the family ``layout``'s rules first, then the shared :data:`RULES`;
    None when no rule names it."""
    for pattern, roles in _family_rules(layout) + RULES:
        if pattern.search(key):
            return roles
    return None


@functools.cache
def _family_rules(layout: PruneLayout) -> tuple[tuple[re.Pattern[str], tuple[str | None, ...]], ...]:
    return tuple((re.compile(p), roles) for p, roles in layout.rules)


def _teacher_key(key: str, prefix: str, layer_map: Sequence[int]) -> tuple[str, int | None]:
    """The teacher tensor a student tensor is cut from, and the student layer it belongs to (None outside the layer
    list ``prefix``): student layer i reads teacher layer ``layer_map[i]``."""
    if not key.startswith(prefix):
        return key, None
    idx, rest = key[len(prefix) :].split(".", 1)
    layer = int(idx)
    return f"{prefix}{layer_map[layer]}.{rest}", layer


def _slice_axes(
    key: str,
    value: torch.Tensor,
    roles: tuple[str | None, ...],
    layer: int | None,
    sel: Selection,
    head_dim: int,
) -> tuple[torch.Tensor, list[str]]:
    """``value`` with each axis cut to the kept indices of its role (H: channels, A: the layer's kept heads'
    channels, F: the layer's neurons, None: whole; ``A3`` / ``F2``: A / F in each of the 3 / 2 equal blocks of a
    fused axis, e.g. ModernBERT's Q | K | V and input | gate), and the label of each axis. ``ValueError`` for an A
    or F axis outside a layer."""
    channels = torch.tensor(sel.channels)
    names = []
    for axis, role in enumerate(roles):
        if role is None:
            names.append(":")
            continue
        if role == "H":
            index, label = channels, "channels"
        elif layer is None:
            raise ValueError(f"{key}: role {role} outside a layer")
        elif role[0] == "A":
            index, label = torch.tensor(sel.attention_channels(layer, head_dim)), f"heads{sel.heads[layer]}"
        else:
            index, label = torch.tensor(sel.neurons[layer]), "neurons"
        parts = int(role[1:] or 1)
        if parts > 1:  # a fused axis: the same kept indices in each of its equal blocks
            block = value.shape[axis] // parts
            index = torch.cat([index + k * block for k in range(parts)])
            label = f"{label} x{parts}"
        value = value.index_select(axis, index)
        names.append(label)
    return value, names


def slice_state(
    teacher_state: dict[str, torch.Tensor],
    student_shapes: dict[str, tuple[int, ...]],
    layer_prefix: str,
    sel: Selection,
    head_dim: int,
    layout: PruneLayout = BERT_PRUNE,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The student's state dict cut out of the teacher's.

    Args:
        teacher_state: the teacher's ``state_dict()``.
        student_shapes: student tensor name -> shape (of the freshly built student).
        layer_prefix: the layer list's name (``bert.encoder.layer``); student layer i reads teacher layer
            ``sel.layer_map[i]``.
        sel: the kept indices; head_dim: the teacher's head size; layout: the family's (its tensor rules).

    Returns ``(state, copied)``: fp32 tensors for every student name (contiguous copies), and student name ->
    ``"teacher name[index sets]"``. Tensors no rule names are copied whole when the shapes agree (buffers such as
    ``position_ids``). Raises ``ValueError`` for a tensor without teacher counterpart or whose slice does not have the
    student's shape.
    """
    prefix = layer_prefix + "."
    state, copied = {}, {}
    for key, shape in student_shapes.items():
        src, layer = _teacher_key(key, prefix, sel.layer_map)
        if src not in teacher_state:
            raise ValueError(f"student tensor {key} has no teacher counterpart {src}")
        value = teacher_state[src].detach().to(torch.float32)
        roles = roles_of(key, layout)
        if roles is None or len(roles) != value.dim():
            if tuple(value.shape) != tuple(shape):
                raise ValueError(
                    f"student tensor {key} {tuple(shape)}: no slicing rule and the teacher's {src} is "
                    f"{tuple(value.shape)}"
                )
            state[key], copied[key] = value.clone(), src
            continue
        value, names = _slice_axes(key, value, roles, layer, sel, head_dim)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"student tensor {key}: the slice of {src} is {tuple(value.shape)}, the student's {tuple(shape)}"
            )
        state[key], copied[key] = value.contiguous(), f"{src}[{', '.join(names)}]"
    return state, copied


def _scores(t: torch.Tensor) -> list[float]:
    return [float(f"{v:.6g}") for v in t.tolist()]


def _pruned_config(tc: PreTrainedConfig, hidden: int, heads: int, inter: int, layer_map: list[int]) -> PreTrainedConfig:
    """The teacher's config for the student (:meth:`pretrain.families.Family.student_config`: per-layer fields
    follow ``layer_map``) with the student's sizes (the embedding size follows the hidden size when the teacher's
    equals its hidden size)."""
    family = family_of(tc)
    config = family.student_config(tc, layer_map)
    family.set_sizes(config, hidden, heads, inter)
    if getattr(config, "embedding_size", None) == tc.hidden_size:
        config.embedding_size = hidden
    return config


def _check_tie(teacher: PreTrainedModel, student: PreTrainedModel) -> None:
    """``ValueError`` when the teacher's decoder is tied to its word embeddings and the student's is not."""
    t_out, s_out = teacher.get_output_embeddings(), student.get_output_embeddings()
    t_tied = t_out is not None and t_out.weight is teacher.get_input_embeddings().weight
    if t_tied and s_out.weight is not student.get_input_embeddings().weight:
        raise ValueError("the pruned student lost the tie between the decoder and the word embeddings")


def _check_calibration(calibration: Sequence[Batch] | None) -> Sequence[Batch]:
    """The calibration sample, or :class:`ConfigError` when none (``student.init``) or an empty one
    (``student.calibration_sequences``) was given."""
    if calibration is None:
        raise ConfigError(
            "student.init: 'prune' needs a calibration sample of the train shards and none was given: pass "
            "calibration=pretrain.prune.calibration_batches(data.dir, n=student.calibration_sequences, "
            "seed=train.seed) to pretrain.student.build_student (the pretraining recipe, "
            "pretrain.recipes.PretrainRecipe.build_student, does); use student.init='teacher' or 'random' where "
            "there are no shards to draw it from"
        )
    if not calibration:
        raise ConfigError(
            "student.calibration_sequences: student.init='prune' needs a calibration sample and the one given "
            "has no batches: draw it from the train split with pretrain.prune.calibration_batches"
        )
    return calibration


def _prune_record(
    tc: PreTrainedConfig, layer_map: list[int], imp: Importance, sel: Selection, sizes: tuple[int, int, int]
) -> dict[str, Any]:
    """The ``prune`` entry of the student record (JSON-serialisable; see :func:`build_pruned`)."""
    hidden, heads, inter = sizes
    return {
        "method": METHOD,
        "calibration": {
            "sequences": imp.sequences,
            "tokens": imp.tokens,
            "sha256": imp.sha256,
            "source": "train split of data.dir, drawn with train.seed",
        },
        "hidden_size": [tc.hidden_size, hidden],
        "num_attention_heads": [tc.num_attention_heads, heads],
        "intermediate_size": [tc.intermediate_size, inter],
        "hidden_channels": sel.channels,
        "heads": sel.heads,
        "neurons": sel.neurons,
        "scores": {
            "hidden_channels": _scores(imp.channels),
            "heads": [_scores(imp.heads[t]) for t in layer_map],
            "neurons": [_scores(imp.neurons[t]) for t in layer_map],
        },
    }


def _prune_note(tc: PreTrainedConfig, layer_map: list[int], imp: Importance, sizes: tuple[int, int, int]) -> str:
    """The record's one-line note: layers and sizes, teacher -> student, and the calibration sample's size."""
    hidden, heads, inter = sizes
    return (
        f"pruned (Minitron): {len(layer_map)} of {tc.num_hidden_layers} layers, hidden {tc.hidden_size} -> "
        f"{hidden}, heads {tc.num_attention_heads} -> {heads} (head size "
        f"{tc.hidden_size // tc.num_attention_heads}), intermediate {tc.intermediate_size} -> {inter}; "
        f"importance on {imp.sequences} calibration sequences ({imp.tokens:,} tokens)"
    )


def build_pruned(
    teacher: PreTrainedModel,
    layer_map: list[int],
    calibration: Sequence[Batch] | None,
    *,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The pruned student (``student.init="prune"``; called by :func:`pretrain.student.build_student`).

    ``type(teacher)`` with ``len(layer_map)`` layers and the target sizes (``student.hidden_size``,
    ``num_attention_heads``, ``intermediate_size``; None = derived from the teacher, :func:`resolve_targets`), every
    tensor sliced from the teacher (:func:`slice_state`) after :func:`compute_importance` on ``calibration`` and
    :func:`select`. Returns ``(student, record)``: record has ``layer_map``, ``copied``, ``initialized`` (empty),
    ``notes`` and ``prune`` (JSON-serialisable: the method, the calibration sample's size and sha256, the sizes
    [teacher, student], the kept ``hidden_channels``, ``heads`` and ``neurons`` per student layer as teacher
    indices, and the importance ``scores`` of every channel, head and neuron of the mapped layers).

    ``calibration``: the micro-batches the importance is measured on (:func:`calibration_batches`; the forwards run
    on their device). The student also gets a plain attribute ``pruned_hidden_channels`` (the kept channels; not
    saved) from which :class:`pretrain.distill.DistillationModel` initialises its hidden-state projections.

    Raises :class:`ConfigError` for bad targets (before the calibration forwards), no calibration sample
    (``student.init``), an empty one (``student.calibration_sequences``) or a teacher without BERT's layout
    (``student.init``).
    """
    family = family_of(teacher)
    t_name, blocks = family.layer_list(teacher)
    tc = teacher.config
    layout = family.pruning(tc.num_attention_heads, tc.num_attention_heads)  # a family without a layout: refused
    for t in layer_map:
        block_parts(blocks[t], layout)
    sizes = resolve_targets(tc, hidden_size, num_attention_heads, intermediate_size)
    family.pruning(tc.num_attention_heads, sizes[1])  # fewer heads where a per-head table is shared: refused
    imp = compute_importance(teacher, _check_calibration(calibration), layer_map)
    hidden, heads, inter = sizes
    sel = select(imp, layer_map, hidden_size=hidden, num_attention_heads=heads, intermediate_size=inter)
    attn = student_attn_implementation(type(teacher), teacher)  # the teacher's kernel where the class has it
    student = new_like(type(teacher), _pruned_config(tc, *sizes, layer_map), base_model(teacher), attn)
    s_name, _ = family.layer_list(student)
    if s_name != t_name:
        raise ValueError(f"layer list found at {s_name!r} in the student but {t_name!r} in the teacher")
    shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    head_dim = tc.hidden_size // tc.num_attention_heads
    state, copied = slice_state(teacher.state_dict(), shapes, t_name, sel, head_dim, layout)
    student.load_state_dict(state, strict=True)
    _check_tie(teacher, student)
    # a plain attribute (not saved, not in the config): DistillationModel starts its projections from it. torch's
    # stub of nn.Module.__setattr__ admits only tensors and modules; any value is stored as a plain attribute.
    student.pruned_hidden_channels = list(sel.channels)  # type: ignore[assignment]
    record = {
        "layer_map": list(layer_map),
        "copied": copied,
        "initialized": [],
        "notes": [_prune_note(tc, layer_map, imp, sizes)],
        "prune": _prune_record(tc, layer_map, imp, sel, sizes),
    }
    return student, record
