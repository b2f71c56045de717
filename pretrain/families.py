"""One adapter per encoder family: where its blocks, Q/K/V, MLM head and per-layer config fields live.

A family's quirks live here and nowhere else; surgery (:mod:`pretrain.student`), losses (:mod:`pretrain.distill`),
pruning (:mod:`pretrain.prune`), the teacher (:mod:`pretrain.teacher`) and evaluation ask the adapter that
:func:`family_of` looks up once from ``config.model_type``. The families and what differs between them (transformers
5.x; read from its modeling files):

| family | blocks (base model) | Q / K / V (in a block) | MLM head | SDPA | per-layer fields |
| --- | --- | --- | --- | --- | --- |
| bert | encoder.layer | attention.self.query/key/value | cls.predictions | yes | - |
| roberta, xlm-r | encoder.layer | attention.self.query/key/value | lm_head | yes | - |
| electra | encoder.layer | attention.self.query/key/value | generator_* | yes | - |
| distilbert | transformer.layer | attention.q_lin/k_lin/v_lin | vocab_* | yes | - |
| deberta-v2 | encoder.layer | attention.self.query_proj/... | cls.predictions | no | (rel_embeddings shared) |
| mpnet | encoder.layer | attention.attn.q/k/v | lm_head | no | (relative bias shared) |
| modernbert | layers | attn.Wqkv (fused; RoPE) | head + decoder | yes | layer_types |

Width pruning (:class:`PruneLayout`): BERT, RoBERTa / XLM-R, ELECTRA, DeBERTa-v2/v3 (the shared ``rel_embeddings``
lose the pruned hidden columns, the conv layer of ``conv_kernel_size > 0`` its pruned in / out channels;
``key_proj`` / ``query_proj`` rows follow each layer's heads, as they project the position table too), ModernBERT
(``Wqkv`` thirds and ``Wi``'s input / gate halves cut alike); MPNet in the feed-forward only (its per-head relative
bias is shared by all layers); DistilBERT refused.

ALBERT (one layer shared by all depths) is refused: a student cannot keep "every other" copy of one shared layer. A
model type not in the table gets the generic adapter: blocks found by structure, Q/K/V by the known names.

Where Q / K / V are taken (the MiniLM terms, :class:`QKVTap`): where the model computes them, i.e. the outputs of the
projections applied to the block's attention input (after the pre-norm for ModernBERT, whose ``attn_norm`` runs
before ``Wqkv``). For the rotary family (ModernBERT) Q and K are taken AFTER the rotary embedding: positions enter
ModernBERT's attention scores only through that rotation, so ``softmax(Q K^T / sqrt(d))`` before it is a relation
the model never computes, while after it (relation heads = the model's heads) it is the model's own attention
distribution on its full-attention layers (on sliding layers, the model additionally masks keys outside its window).
For DeBERTa-v2/v3 and MPNet the attention term is the content-to-content relation of the query / key projections:
DeBERTa's disentangled scores add content-to-position and position-to-content terms built from the shared
``rel_embeddings``, and MPNet adds a relative-position bias shared by all layers; both depend on the positions and
those shared tables, which a teacher-initialised student copies exactly, so the transferred relation is the part
that depends on the content (MiniLMv2's relations are defined on the projections in the same way, Wang et al. 2021).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pretrain.schema import ConfigError
from pretrain.structure import base_model, find_layer_list, find_module, model_config, require_module

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle
    from transformers import PreTrainedConfig

log = logging.getLogger("pretrain.families")

SEPARATE_QKV_NAMES = (
    ("query", "key", "value"),
    ("q_lin", "k_lin", "v_lin"),
    ("q_proj", "k_proj", "v_proj"),
    ("query_proj", "key_proj", "value_proj"),
    ("q", "k", "v"),
)


class _Chain(nn.Module):
    """Apply modules in order (a head made of sibling modules, like DistilBERT's vocab_transform ... projector)."""

    def __init__(self, *mods: nn.Module):
        super().__init__()
        self.mods = list(mods)  # plain list: not registered, the model already owns them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.mods:
            x = m(x)
        return x


class _TiedHead(nn.Module):
    """DeBERTa-v2's non-legacy head (``lm_predictions.lm_head``), which takes the word embeddings as an argument."""

    def __init__(self, head: nn.Module, embeddings: nn.Module):
        super().__init__()
        self.mods = [head, embeddings]  # not registered: the model owns them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mods[0](x, self.mods[1])


@dataclasses.dataclass(frozen=True)
class QKVSource:
    """Where one block computes its queries, keys and values: three ``nn.Linear`` (``q``, ``k``, ``v``), or one fused
    ``nn.Linear`` (``fused``, output ``[..., 3 * D]`` = Q | K | V) with the attention module ``attention`` whose
    ``position_embeddings`` (cos, sin) rotate Q and K when ``rotary``. ``block``: the transformer block they belong
    to (each of its forwards starts a new capture)."""

    q: nn.Linear | None = None
    k: nn.Linear | None = None
    v: nn.Linear | None = None
    fused: nn.Linear | None = None
    attention: nn.Module | None = None
    rotary: bool = False
    num_heads: int = 1
    block: nn.Module | None = None

    def linears(self) -> tuple[nn.Linear, ...]:
        """The projection modules (three, or the fused one)."""
        if self.fused is not None:
            return (self.fused,)
        return tuple(m for m in (self.q, self.k, self.v) if m is not None)


def _rotate(q: torch.Tensor, k: torch.Tensor, attention: nn.Module, cos_sin: Any, heads: int):
    """Q, K [B, L, D] rotated per model head with the model's own ``apply_rotary_pos_emb`` (its module's function)
    and ``cos_sin`` = the ``position_embeddings`` its attention received; returned as [B, L, D]."""
    apply = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    cos, sin = cos_sin
    bsz, length, dim = q.shape

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(bsz, length, heads, dim // heads).transpose(1, 2)

    qr, kr = apply(split(q), split(k), cos, sin, unsqueeze_dim=1)
    return qr.transpose(1, 2).reshape(bsz, length, dim), kr.transpose(1, 2).reshape(bsz, length, dim)


def tap_qkv(src: QKVSource, put: Callable[[int, torch.Tensor], None]) -> list[RemovableHandle]:
    """Forward hooks that call ``put(j, tensor)`` with Q (j=0), K (1), V (2), each [B, L, D], every time the block
    runs; returns the handles (remove them after the forward). Separate projections: their first output in each
    forward of ``src.block`` (DeBERTa applies ``key_proj`` / ``query_proj`` again to the shared ``rel_embeddings``
    for its position terms, after the content projections). Fused: the output split in three (ModernBERT's
    ``Wqkv``: ``view(..., 3, heads, head_dim)``, i.e. Q | K | V), Q and K rotated with the position embeddings the
    attention module received when ``src.rotary``."""
    seen: dict[Any, Any] = {}
    handles = []
    if src.block is not None:
        handles.append(src.block.register_forward_pre_hook(lambda _m, _a: seen.clear()))
    if src.fused is None:
        for j, lin in enumerate(src.linears()):

            def hook(_m: nn.Module, _inp: Any, out: torch.Tensor, j: int = j) -> None:
                if j not in seen:  # the first call of this block's forward: the content projection
                    seen[j] = True
                    put(j, out)

            handles.append(lin.register_forward_hook(hook))
        return handles

    def pre(_m: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        seen["pos"] = kwargs.get("position_embeddings")

    def fused(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        q, k, v = out.chunk(3, dim=-1)
        if src.rotary:
            if seen.get("pos") is None or src.attention is None:
                raise RuntimeError(
                    f"{type(src.attention).__name__}: no position_embeddings reached the attention; cannot rotate Q/K"
                )
            q, k = _rotate(q, k, src.attention, seen["pos"], src.num_heads)
        for j, t in enumerate((q, k, v)):
            put(j, t)

    handles.append(src.fused.register_forward_hook(fused))
    if src.rotary and src.attention is not None:
        handles.append(src.attention.register_forward_pre_hook(pre, with_kwargs=True))
    return handles


Roles = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class PruneLayout:
    """What width pruning (:mod:`pretrain.prune`) reads in one family's blocks (dotted paths inside a block unless
    said otherwise).

    ``heads_in``: the module whose input is the heads' outputs, concatenated [B, L, heads * head_dim] (the attention
    output projection); ``neurons_in``: the module whose input is the feed-forward activations [B, L, intermediate]
    (after the activation, and the gate for a GLU); ``norms``: the block's norms whose outputs score the hidden
    channels (an ``nn.Identity`` there is skipped: ModernBERT's block 0); ``embeddings_norm``: the embeddings' norm,
    under the base model; ``required``: the block modules the layout needs (checked first). ``rules``: the family's
    tensor-name patterns and axis roles, tried before the shared BERT ones (H: hidden channels; A: the layer's kept
    heads' channels; F: its neurons; ``A3`` / ``F2``: a fused tensor holding 3 (Q | K | V) / 2 (input | gate) such
    blocks, each cut alike). ``shared_heads``: a per-head table shared by all layers (MPNet's relative attention
    bias): heads can then only be kept all."""

    heads_in: str
    neurons_in: str
    norms: tuple[str, ...]
    embeddings_norm: str
    required: tuple[str, ...]
    rules: tuple[tuple[str, Roles], ...] = ()
    shared_heads: str | None = None


BERT_PRUNE = PruneLayout(
    heads_in="attention.output.dense",
    neurons_in="output.dense",
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    embeddings_norm="embeddings.LayerNorm",
    required=(
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    ),
)
DEBERTA_PRUNE = dataclasses.replace(
    BERT_PRUNE,
    required=tuple(
        p.replace("self.query", "self.query_proj")
        .replace("self.key", "self.key_proj")
        .replace("self.value", "self.value_proj")
        for p in BERT_PRUNE.required
    ),
    rules=(
        # content and (share_att_key=False) position projections: rows are the layer's heads, columns the channels
        (r"\.attention\.self\.(query_proj|key_proj|value_proj|pos_key_proj|pos_query_proj)\.weight$", ("A", "H")),
        (r"\.attention\.self\.(query_proj|key_proj|value_proj|pos_key_proj|pos_query_proj)\.bias$", ("A",)),
        (r"(^|\.)encoder\.rel_embeddings\.weight$", (None, "H")),  # shared by all layers: its hidden columns
        # the conv layer (conv_kernel_size > 0): Conv1d(hidden, hidden, k), its in and out channels are the hidden
        # ones (a grouped conv is refused by pretrain.prune)
        (r"(^|\.)encoder\.conv\.conv\.weight$", ("H", "H", None)),
        (r"(^|\.)encoder\.conv\.conv\.bias$", ("H",)),
    ),
)
MPNET_PRUNE = PruneLayout(
    heads_in="attention.attn.o",
    neurons_in="output.dense",
    norms=("attention.LayerNorm", "output.LayerNorm"),
    embeddings_norm="embeddings.LayerNorm",
    required=("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o", "intermediate.dense"),
    rules=(
        (r"\.attention\.attn\.(q|k|v)\.weight$", ("A", "H")),
        (r"\.attention\.attn\.(q|k|v)\.bias$", ("A",)),
        (r"\.attention\.attn\.o\.weight$", ("H", "A")),
        (r"\.attention\.attn\.o\.bias$", ("H",)),
    ),
    shared_heads="encoder.relative_attention_bias (one bias column per head, shared by all layers)",
)
MODERNBERT_PRUNE = PruneLayout(
    heads_in="attn.Wo",
    neurons_in="mlp.Wo",
    norms=("attn_norm", "mlp_norm"),
    embeddings_norm="embeddings.norm",
    required=("attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo", "mlp_norm"),
    rules=(
        (r"\.attn\.Wqkv\.weight$", ("A3", "H")),  # Q | K | V: the kept heads' rows cut alike in each third
        (r"\.attn\.Wqkv\.bias$", ("A3",)),
        (r"\.attn\.Wo\.weight$", ("H", "A")),
        (r"\.attn\.Wo\.bias$", ("H",)),
        (r"\.mlp\.Wi\.weight$", ("F2", "H")),  # input | gate halves: the kept neurons cut alike in both
        (r"\.mlp\.Wi\.bias$", ("F2",)),
        (r"\.mlp\.Wo\.weight$", ("H", "F")),
        (r"\.mlp\.Wo\.bias$", ("H",)),
        (r"(^|\.)(attn_norm|mlp_norm|final_norm|norm)\.(weight|bias)$", ("H",)),
        (r"(^|\.)head\.dense\.weight$", ("H", "H")),
        (r"(^|\.)head\.dense\.bias$", ("H",)),
    ),
)


@dataclasses.dataclass(frozen=True)
class Family:
    """One encoder family's layout (see the module docstring's table). Paths are dotted module paths: ``layers``
    under the base model (``model.base_model``), ``qkv`` / ``fused_qkv`` / ``attention`` inside one block, ``head``
    under the model with the MLM head (applied in order).

    ``layer_fields``: config fields holding one value per layer (ModernBERT's ``layer_types``), which a student
    takes from the teacher layers it copies. ``identity_first_norm``: the block attribute that is ``nn.Identity`` in
    block 0 and a norm elsewhere (ModernBERT's ``attn_norm``). ``prune_layout``: what width pruning reads
    (:class:`PruneLayout`), None when it does not support the family, ``prune`` then saying what the family lacks.
    ``relation``: what the MiniLM attention term compares. ``intermediate_field``: the config's name of the
    feed-forward size (DistilBERT's ``hidden_dim``; its ``dim`` / ``n_heads`` / ``n_layers`` are reached through
    the config's ``attribute_map`` as ``hidden_size`` / ``num_attention_heads`` / ``num_hidden_layers``)."""

    name: str
    model_types: tuple[str, ...]
    layers: str | None = None
    qkv: tuple[str, str, str] | None = None
    fused_qkv: str | None = None
    attention: str | None = None
    rotary: bool = False
    head: tuple[str, ...] | None = None
    layer_fields: tuple[str, ...] = ()
    identity_first_norm: str | None = None
    prune: str | None = None
    prune_layout: PruneLayout | None = None
    relation: str = "the model's attention distribution (relation heads = its heads)"
    intermediate_field: str = "intermediate_size"

    def layer_list(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """``(qualified name, blocks)``: the ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks at this
        family's path (``bert.encoder.layer``, ``model.layers``, ...); found by structure for the generic family.
        Raises ``ValueError`` when it is not there."""
        n = model_config(model).num_hidden_layers
        if self.layers is not None:
            prefix = str(getattr(model, "base_model_prefix", ""))
            base = base_model(model)
            for name in ((f"{prefix}.{self.layers}" if base is not model else self.layers), self.layers):
                found = find_module(model, name)
                if isinstance(found, nn.ModuleList) and len(found) == n:
                    return name, found
        return find_layer_list(model)

    def qkv_source(self, block: nn.Module, num_heads: int) -> QKVSource:
        """Where ``block`` computes Q / K / V (``num_heads``: the model's attention heads, for the rotary split).
        Raises ``ValueError`` naming the block when none is found."""
        if self.fused_qkv is not None:
            fused = find_module(block, self.fused_qkv)
            attn = find_module(block, self.attention) if self.attention else None
            if isinstance(fused, nn.Linear):
                return QKVSource(fused=fused, attention=attn, rotary=self.rotary, num_heads=num_heads, block=block)
        if self.qkv is not None:
            q, k, v = (find_module(block, n) for n in self.qkv)
            if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear):
                return QKVSource(q=q, k=k, v=v, num_heads=num_heads, block=block)
        for _, mod in block.named_modules():
            for names in SEPARATE_QKV_NAMES:
                q, k, v = (getattr(mod, n, None) for n in names)
                if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear):
                    return QKVSource(q=q, k=k, v=v, num_heads=num_heads, block=block)
        raise ValueError(
            f"{type(block).__name__} ({self.name} family): no query/key/value projections found; the attention and "
            f"value relation losses (loss.alpha_att, loss.alpha_val) need them: set those weights to 0"
        )

    def mlm_head(self, model: nn.Module) -> nn.Module | None:
        """The MLM head as a callable ``[..., hidden] -> [..., vocab]`` logits, or None when ``model`` has none.
        Position-wise: a head applied to ``hidden[positions]`` gives ``full_logits[positions]``."""
        if self.head is None:
            return _generic_head(model)
        mods = [find_module(model, p) for p in self.head]
        if self.name == "deberta-v2" and mods[0] is None:
            lm = find_module(model, "lm_predictions.lm_head")
            emb = find_module(model, "deberta.embeddings.word_embeddings")
            return None if lm is None or emb is None else _TiedHead(lm, emb)
        if any(m is None for m in mods):
            return None
        found = [m for m in mods if m is not None]
        return found[0] if len(found) == 1 else _Chain(*found)

    def head_prefixes(self, model: nn.Module) -> list[str]:
        """State-dict prefixes (``"cls.predictions."``) of the MLM head's own tensors."""
        if self.head is None:
            return ["cls.", "lm_head.", "generator_predictions.", "generator_lm_head.", "vocab_"]
        found = [p for p in (*self.head, "lm_predictions") if find_module(model, p) is not None]
        return [p + "." for p in found]

    def student_config(self, config: PreTrainedConfig, layer_map: list[int]) -> PreTrainedConfig:
        """A copy of the teacher's ``config`` for a student of ``len(layer_map)`` layers, student layer i being
        teacher layer ``layer_map[i]``: every per-layer field (:attr:`layer_fields`) lists the copied layers' values
        (ModernBERT's ``layer_types``: the kinds of the copied layers). Everything else (sliding window, RoPE
        parameters, norms) is the teacher's."""
        import copy

        out = copy.deepcopy(config)
        for field in self.layer_fields:
            values = getattr(config, field, None)
            if isinstance(values, list | tuple) and len(values) == config.num_hidden_layers:
                setattr(out, field, [values[i] for i in layer_map])
        out.num_hidden_layers = len(layer_map)
        return out

    def intermediate_size(self, config: PreTrainedConfig) -> int:
        """The feed-forward size of ``config`` (neurons per layer) under this family's name for it."""
        return int(getattr(config, self.intermediate_field))

    def set_sizes(self, config: PreTrainedConfig, hidden: int, heads: int, inter: int) -> None:
        """Set ``config``'s hidden size, head count and feed-forward size in place, under this family's names."""
        config.hidden_size, config.num_attention_heads = hidden, heads
        setattr(config, self.intermediate_field, inter)

    def check_copied_map(self, layer_map: list[int]) -> None:
        """Refuse a teacher-initialised layer map this family cannot express: for ModernBERT, block 0 has no
        attention norm (``attn_norm`` is ``nn.Identity``), so the student's slot 0 must be teacher layer 0 (a layer
        copied there from elsewhere would lose its norm, and a config cannot give slot 0 one). Raises
        :class:`ConfigError` (``student.layers``)."""
        if self.identity_first_norm and layer_map and layer_map[0] != 0:
            raise ConfigError(
                f"student.layers: {layer_map} starts at teacher layer {layer_map[0]}, but a {self.name} block in "
                f"slot 0 has no {self.identity_first_norm} (it is nn.Identity there), so teacher layer "
                f"{layer_map[0]}'s norm would be lost; start the map at layer 0 (e.g. 'distilbert', 'every_other' "
                f"or 'cadence')"
            )

    def layer_kinds(self, config: PreTrainedConfig) -> list[str] | None:
        """The attention kind of each layer (``config.layer_types``: "full_attention" / "sliding_attention"), or
        None when every layer is alike."""
        kinds = getattr(config, "layer_types", None) if "layer_types" in self.layer_fields else None
        return list(kinds) if kinds else None

    def pruning(self, teacher_heads: int, student_heads: int) -> PruneLayout:
        """The family's pruning layout; raises :class:`ConfigError` (``student.init``) naming what the family
        lacks: no layout (DistilBERT's q_lin ... ffn.lin2 blocks), or fewer heads than the teacher's where a per-head
        table is shared by all layers (MPNet)."""
        layout = self.prune_layout
        if layout is None:
            raise ConfigError(
                f"student.init: 'prune' does not support the {self.name} family: {self.prune}. Use "
                f"student.init='teacher' (depth only) or 'random'"
            )
        if layout.shared_heads and student_heads != teacher_heads:
            raise ConfigError(
                f"student.num_attention_heads: the {self.name} family cannot drop heads ({student_heads} of "
                f"{teacher_heads}): its {layout.shared_heads} would need different heads per layer. Keep every head "
                f"(student.hidden_size and num_attention_heads null, prune student.intermediate_size only) or use "
                f"student.init='random'"
            )
        return layout


def _generic_head(model: nn.Module) -> nn.Module | None:
    """The MLM head of a model outside the table: BERT's ``cls``, RoBERTa's ``lm_head``, ELECTRA's generator,
    DistilBERT's ``vocab_*`` chain, else None."""
    cls = getattr(model, "cls", None)
    if isinstance(cls, nn.Module):
        predictions = getattr(cls, "predictions", cls)
        return predictions if isinstance(predictions, nn.Module) else cls
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, nn.Module):
        return lm_head
    if hasattr(model, "generator_lm_head"):
        return _Chain(require_module(model, "generator_predictions"), require_module(model, "generator_lm_head"))
    if hasattr(model, "vocab_projector"):
        names = ("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector")
        return _Chain(*(require_module(model, n) for n in names))
    return None


_BERT_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")
FAMILIES: tuple[Family, ...] = (
    Family("bert", ("bert",), "encoder.layer", _BERT_QKV, head=("cls.predictions",), prune_layout=BERT_PRUNE),
    Family(
        "roberta",
        ("roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "data2vec-text"),
        "encoder.layer",
        _BERT_QKV,
        head=("lm_head",),
        prune_layout=BERT_PRUNE,
    ),
    Family(
        "electra",
        ("electra",),
        "encoder.layer",
        _BERT_QKV,
        head=("generator_predictions", "generator_lm_head"),
        prune_layout=BERT_PRUNE,
    ),
    Family(
        "distilbert",
        ("distilbert",),
        "transformer.layer",
        ("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        head=("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
        prune="its blocks are not BERT's layout (q_lin ... ffn.lin2, sa_layer_norm)",
        intermediate_field="hidden_dim",
    ),
    Family(
        "deberta-v2",
        ("deberta-v2",),
        "encoder.layer",
        ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"),
        head=("cls.predictions",),
        prune_layout=DEBERTA_PRUNE,
        relation="the content-to-content relation of query_proj / key_proj (the c2p / p2c terms of the shared "
        "rel_embeddings are left out)",
    ),
    Family(
        "mpnet",
        ("mpnet",),
        "encoder.layer",
        ("attention.attn.q", "attention.attn.k", "attention.attn.v"),
        head=("lm_head",),
        prune_layout=MPNET_PRUNE,
        relation="the content relation of q / k (the relative-position bias shared by all layers is left out)",
    ),
    Family(
        "modernbert",
        ("modernbert",),
        "layers",
        fused_qkv="attn.Wqkv",
        attention="attn",
        rotary=True,
        head=("head", "decoder"),
        layer_fields=("layer_types",),
        identity_first_norm="attn_norm",
        prune_layout=MODERNBERT_PRUNE,
        relation="the model's attention distribution after RoPE (relation heads = its heads; sliding layers also "
        "mask keys outside their window)",
    ),
)
GENERIC = Family("generic", (), prune_layout=BERT_PRUNE)  # pruning checks the BERT layout is there
REFUSED = {
    "albert": "ALBERT shares one layer across all depths (num_hidden_groups), so a student cannot keep a subset of "
    "distinct layers; use a BERT, RoBERTa, ELECTRA or DeBERTa teacher"
}
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_of(model_or_config: Any) -> Family:
    """The adapter of a model or config, by ``config.model_type``; :data:`GENERIC` for a type not in the table.
    Raises :class:`ConfigError` (``teacher.name_or_path``) for a refused family (ALBERT)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = str(getattr(config, "model_type", ""))
    if model_type in REFUSED:
        raise ConfigError(f"teacher.name_or_path: a {model_type} model is not supported: {REFUSED[model_type]}")
    return _BY_TYPE.get(model_type, GENERIC)


def mlm_head(model: nn.Module):  # untyped result (Any) as before: callers check None by the loss terms they run
    """The MLM head of ``model`` as a callable ``[..., hidden] -> [..., vocab]`` logits, or None when it has none:
    the family's layout (:meth:`Family.mlm_head`): BERT / DeBERTa ``cls.predictions``, RoBERTa / XLM-R / MPNet
    ``lm_head``, ELECTRA generators ``generator_predictions`` + ``generator_lm_head``, DistilBERT ``vocab_transform``
    ... ``vocab_projector``, ModernBERT ``head`` + ``decoder``. Position-wise: a head applied to
    ``hidden[positions]`` gives exactly ``full_logits[positions]``."""
    return family_of(model).mlm_head(model)


# ----------------------------------------------------------------------------------------------------------------
# Attention kernels

_SAID: set[tuple[str, str]] = set()


def _say_once(key: tuple[str, str], msg: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        log.warning(msg)


def flash_attention_available(cuda: bool) -> bool:
    """Whether FlashAttention-2 can run: the ``flash_attn`` package is installed and the model runs on CUDA."""
    return cuda and importlib.util.find_spec("flash_attn") is not None


def model_class(auto: Any, config: PreTrainedConfig) -> type | None:
    """The class an ``AutoModel*`` class ``auto`` builds for ``config`` (None when it is not known)."""
    try:
        found = auto._model_mapping[type(config)]
    except (KeyError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def attn_implementation(cls: type | None, wanted: str, *, cuda: bool = False, who: str = "model") -> str:
    """The attention kernel to load class ``cls`` with, for the requested ``wanted`` ("sdpa", "eager" or
    "flash_attention_2"): the request when the class supports it; "flash_attention_2" falls back to "sdpa" (then
    "eager") without ``flash_attn`` or off CUDA; "sdpa" falls back to "eager" for a class without an SDPA path
    (DeBERTa-v2/v3, MPNet in transformers 5). A fallback is logged once per process and (class, request), as a
    warning line naming ``who``."""
    name = getattr(cls, "__name__", "the model")
    sdpa = bool(getattr(cls, "_supports_sdpa", False))
    if wanted == "flash_attention_2":
        if flash_attention_available(cuda) and getattr(cls, "_supports_flash_attn", False):
            return wanted
        fallback = "sdpa" if sdpa else "eager"
        why = "flash_attn is not installed or not on CUDA" if not flash_attention_available(cuda) else "no FA2 path"
        _say_once((name, wanted), f"{who} {name}: flash_attention_2 unavailable ({why}); using {fallback}")
        return fallback
    if wanted == "sdpa" and not sdpa:
        _say_once(
            (name, wanted),
            f"{who} {name}: transformers has no SDPA attention for this class; using eager attention",
        )
        return "eager"
    return wanted


def student_attn_implementation(cls: type, teacher: nn.Module) -> str:
    """The attention kernel of a student of class ``cls`` distilled from ``teacher``: the teacher's own
    (``config._attn_implementation``, as :mod:`pretrain.teacher` loaded it; "sdpa" when unset), so both run the same
    kernel: "flash_attention_2" when the teacher uses it and ``cls`` has an FA2 path (on CUDA with ``flash_attn``),
    "sdpa" where ``cls`` supports it, else "eager"; each fallback said once (:func:`attn_implementation`)."""
    wanted = getattr(model_config(teacher), "_attn_implementation", None)
    if wanted not in ("eager", "sdpa", "flash_attention_2"):
        wanted = "sdpa"
    return attn_implementation(cls, str(wanted), cuda=torch.cuda.is_available(), who="student")
