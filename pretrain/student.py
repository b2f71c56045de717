"""Build a student from a teacher: layer map, architecture (same class / DistilBERT), weight copy.

The DistilBERT recipe (Sanh et al., 2019, sec. 3 "Student initialization"; the ``scripts/distillation/
extract_distilbert.py`` of Hugging Face's ``examples/research_projects/distillation``): the student has the teacher's
architecture with fewer layers, initialised from the teacher by taking one layer out of two; embeddings and the MLM head
are copied. Layers are found by structure (the encoder's ``nn.ModuleList`` of blocks), so BERT, RoBERTa, XLM-R, ELECTRA
and other BERT-like encoders work, with or without an MLM head.

``init="random"`` builds a student of any depth / width from scratch (TinyBERT / MiniLM style); hidden-state losses then
go through learned projections when the widths differ (see :mod:`pretrain.distill`). ``init="prune"`` builds a
narrower student out of the teacher: the mapped layers, with the heads, feed-forward neurons and hidden channels that
matter most on a calibration sample (Minitron, Muralidharan et al. 2024; :mod:`pretrain.prune`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pretrain.families import family_of, mlm_head, student_attn_implementation
from pretrain.prune import Batch, build_pruned
from pretrain.schema import ConfigError, check, param

# the structure helpers (pretrain.structure) and the MLM head (pretrain.families), imported here too for the modules
# that read them from here
from pretrain.structure import base_model, find_layer_list, new_like, pretrained

if TYPE_CHECKING:
    from transformers import DistilBertConfig, PreTrainedConfig, PreTrainedModel

LAYER_SPECS = ("every_other", "distilbert", "cadence")
INITS = ("teacher", "random", "prune")


@dataclasses.dataclass
class StudentConfig:
    """The student: which teacher layers it keeps, its architecture and how it is initialised."""

    layers: str | list[int] = param(
        "every_other",
        help='Teacher layers the student keeps, in order: "every_other" (0, 2, 4, ...: one layer out of two, the '
        'DistilBERT recipe), "distilbert" (half the depth evenly spread with the first and last layers, '
        '[0, 2, 4, 7, 9, 11] for 12 layers as in the DistilBERT extraction script), "cadence" (as '
        '"distilbert", each layer chosen among the teacher layers of the attention kind the student\'s position '
        "has in the teacher, so that a ModernBERT student keeps the global / sliding cadence: [0, 2, 4, 6, 8, 11] "
        'for 12 layers with a global layer every 3; the same as "distilbert" for families whose layers are '
        'alike) or a list of 0-based teacher layer indices. With init="random" it gives the layer map of the '
        "intermediate losses.",
    )
    architecture: str = param(
        "same",
        help='"same": the teacher\'s class with fewer layers (RoBERTa -> DistilRoBERTa); "distilbert": a BERT teacher '
        "becomes a DistilBertForMaskedLM (no token types, no pooler; the type-0 token-type embedding is folded "
        "into the position embeddings).",
    )
    init: str = param(
        "teacher",
        help='"teacher": copy embeddings, the chosen layers and the MLM head from the teacher (DistilBERT); "random": '
        'a freshly initialised student of the sizes below (TinyBERT / MiniLM style); "prune": the chosen layers '
        "narrowed to the sizes below by keeping the teacher's most important hidden channels, heads and "
        "feed-forward neurons, scored by their activations on a calibration sample of the train shards (Minitron, "
        "Muralidharan et al. 2024; docs/pruning.md).",
    )
    num_hidden_layers: int | None = param(
        None, help='init="random" only: student depth in layers; null = the number of layers in student.layers.'
    )
    hidden_size: int | None = param(
        None,
        help='init="random" or "prune": student width; null = the teacher\'s. "prune": at most the teacher\'s, '
        "and a multiple of the teacher's head size.",
    )
    num_attention_heads: int | None = param(
        None,
        help='init="random" or "prune": attention heads; null = keep the teacher\'s head size (hidden / 64 for '
        'BERT). "prune" keeps whole teacher heads, so hidden_size / num_attention_heads must equal the '
        "teacher's head size.",
    )
    intermediate_size: int | None = param(
        None,
        help='init="random" or "prune": feed-forward width; null = the teacher\'s ratio to hidden_size (4x for '
        'BERT). "prune": at most the teacher\'s.',
    )
    calibration_sequences: int = param(
        256,
        help='init="prune" only: train sequences (drawn with train.seed) on which the teacher\'s activations '
        "score the heads, neurons and channels; a few hundred, as Minitron's 1,024 samples at a smaller "
        "scale.",
    )

    def validate(self) -> None:
        """Check the section's values; raises :class:`ConfigError` naming ``student.<key>``."""
        self._validate_layers()
        check(
            self.architecture in ("same", "distilbert"),
            "student.architecture",
            f"{self.architecture!r} is not one of ['same', 'distilbert']",
        )
        check(self.init in INITS, "student.init", f"{self.init!r} is not one of {list(INITS)}")
        self._validate_sizes()
        if self.init == "prune":
            self._validate_prune()
        check(
            isinstance(self.calibration_sequences, int) and self.calibration_sequences > 0,
            "student.calibration_sequences",
            f"{self.calibration_sequences!r} must be a positive integer",
        )
        if self.hidden_size and self.num_attention_heads:
            check(
                self.hidden_size % self.num_attention_heads == 0,
                "student.num_attention_heads",
                f"{self.num_attention_heads} does not divide student.hidden_size={self.hidden_size}",
            )

    def _validate_layers(self) -> None:
        """``student.layers``: one of :data:`LAYER_SPECS`, or a non-empty list of distinct non-negative indices."""
        if isinstance(self.layers, str):
            check(
                self.layers in LAYER_SPECS,
                "student.layers",
                f"{self.layers!r} is not one of {list(LAYER_SPECS)} or a list of teacher layer indices",
            )
            return
        check(len(self.layers) > 0, "student.layers", "the list is empty; give at least one teacher layer index")
        check(
            all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers),
            "student.layers",
            f"{self.layers!r}: indices must be non-negative integers (0 = first layer)",
        )
        check(
            len(set(self.layers)) == len(self.layers),
            "student.layers",
            f"{self.layers!r} repeats a layer; list each teacher layer at most once",
        )

    def _validate_sizes(self) -> None:
        """The size keys: only with ``init`` "random" or "prune", and positive integers."""
        sizes = {
            k: getattr(self, k)
            for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
        }
        for key, value in sizes.items():
            if value is None:
                continue
            check(
                self.init in ("random", "prune"),
                f"student.{key}",
                f"{value} is only used with student.init='random' or 'prune' (a teacher-initialised student takes "
                f"its sizes from the teacher); remove it or set student.init='random'",
            )
            check(isinstance(value, int) and value > 0, f"student.{key}", f"{value!r} must be a positive integer")

    def _validate_prune(self) -> None:
        """``init="prune"``: the depth is the layer map's and the class the teacher's."""
        check(
            self.num_hidden_layers is None,
            "student.num_hidden_layers",
            f"{self.num_hidden_layers}: with student.init='prune' the depth is the layer map's; choose the "
            f"teacher layers with student.layers",
        )
        check(
            self.architecture == "same",
            "student.architecture",
            f"{self.architecture!r}: student.init='prune' keeps the teacher's class; use 'same'",
        )


def resolve_layer_map(spec: str | list[int], num_teacher_layers: int, kinds: Sequence[str] | None = None) -> list[int]:
    """Teacher layer indices (0-based) the student keeps, in order: student layer i <- teacher layer map[i].

    ``"every_other"``: 0, 2, 4, ... (DistilBERT, Sanh et al. 2019: "taking one layer out of two").
    ``"distilbert"``: ``max(1, N // 2)`` layers evenly spread over 0..N-1 with the first and last included
    (``floor(i * (N - 1) / (M - 1) + 0.5)``), which is the DistilBERT extraction's [0, 2, 4, 7, 9, 11] for N = 12.
    ``"cadence"``: as many layers as "distilbert", student layer i taken among the teacher layers of kind
    ``kinds[i]`` (the teacher's attention kind at position i: its cadence, e.g. ModernBERT's global layer every 3)
    nearest to the evenly spread position (:func:`cadence_layer_map`); "distilbert" when ``kinds`` is None or all
    alike. A list: taken as is after checking. Raises :class:`ConfigError` (``student.layers``) for an index out of
    range, a repeat or a decreasing list.
    """
    n = int(num_teacher_layers)
    if spec == "every_other":
        return list(range(0, n, 2))
    if spec == "cadence" and kinds is not None and len(set(kinds)) > 1:
        return cadence_layer_map(list(kinds))
    if spec == "cadence":
        spec = "distilbert"
    if spec == "distilbert":
        m = max(1, n // 2)
        if m == 1:
            return [n - 1]
        return [math.floor(i * (n - 1) / (m - 1) + 0.5) for i in range(m)]
    if isinstance(spec, str):
        raise ConfigError(f"student.layers: {spec!r} is not one of {list(LAYER_SPECS)} or a list of layer indices")
    layers = [int(i) for i in spec]
    check(len(layers) > 0, "student.layers", "the list is empty; give at least one teacher layer index")
    bad = [i for i in layers if not 0 <= i < n]
    check(not bad, "student.layers", f"{bad} out of range: the teacher has {n} layers (indices 0..{n - 1})")
    check(
        all(a < b for a, b in itertools.pairwise(layers)),
        "student.layers",
        f"{layers} must be strictly increasing (a student keeps the teacher's layer order, each layer once)",
    )
    return layers


def teacher_layer_map(spec: str | list[int], config: PreTrainedConfig) -> list[int]:
    """The teacher layers a student keeps for ``student.layers`` = ``spec`` on a teacher of ``config``, with the
    layer kinds its family adapter reads (:meth:`pretrain.families.Family.layer_kinds`: "cadence" follows
    ModernBERT's global / sliding pattern). The one place a run's map is resolved: :func:`build_student`,
    ``python -m pretrain.config``'s plan and task mode's record ask here. Raises :class:`ConfigError`
    (``student.layers``) as :func:`resolve_layer_map`; (``teacher.name_or_path``) for a refused family (ALBERT)."""
    return resolve_layer_map(spec, int(config.num_hidden_layers), family_of(config).layer_kinds(config))


def cadence_layer_map(kinds: list[str]) -> list[int]:
    """The "cadence" layer map of a teacher whose layer i has attention kind ``kinds[i]``: ``M = max(1, N // 2)``
    layers; student layer i has the kind ``kinds[i]`` (a fresh config of M layers gives it the same cadence) and is
    the teacher layer of that kind, after the previous one, nearest to ``i * (N - 1) / (M - 1)`` (ties: the lower)
    among those that leave the later kinds matchable. [0, 2, 4, 6, 8, 11] for ModernBERT's 12 layers with a global
    layer every 3 (full, sliding, sliding, ...). Raises :class:`ConfigError` when no such map exists."""
    n = len(kinds)
    m = max(1, n // 2)

    def fits(start: int, want: list[str]) -> bool:  # want is a subsequence of kinds[start:]
        it = iter(kinds[start:])
        return all(any(k == w for k in it) for w in want)

    out: list[int] = []
    for i in range(m):
        ideal = (n - 1) if m == 1 else i * (n - 1) / (m - 1)
        prev = out[-1] if out else -1
        fitting = [j for j in range(prev + 1, n) if kinds[j] == kinds[i] and fits(j + 1, kinds[i + 1 : m])]
        if not fitting:
            raise ConfigError(f"student.layers: no 'cadence' map of {m} layers fits the teacher's layer kinds {kinds}")
        out.append(min(fitting, key=lambda j: (abs(j - ideal), j)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Builders


def build_student(
    teacher: nn.Module, cfg: StudentConfig, calibration: Sequence[Batch] | None = None
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Build the student for ``teacher`` (a Hugging Face BERT-like encoder, with or without MLM head).

    Returns ``(student, record)``. The student is an fp32 Hugging Face ``PreTrainedModel`` in train mode, using SDPA
    attention where the class supports it: ``type(teacher)`` with ``len(layer_map)`` layers (``architecture="same"``;
    a teacher without MLM head gives a student without one), or ``DistilBertForMaskedLM`` / ``DistilBertModel``
    (``architecture="distilbert"``). ``record`` (JSON-serialisable, for the run log) has ``layer_map``,
    ``teacher_layers``, ``teacher_class``, ``student_class``, ``architecture``, ``init``, ``copied``
    (student tensor name -> teacher tensor name or a formula), ``initialized`` (student tensors left random) and
    ``notes``.

    ``init="prune"`` (:func:`pretrain.prune.build_pruned`) needs ``calibration``: the micro-batches of
    ``{"input_ids", "attention_mask"}`` int64 [B, L] the importance is measured on (from
    :func:`pretrain.prune.calibration_batches`; the pretraining recipe draws them from the train shards); the other
    inits ignore it. It adds ``prune`` to the record: the kept hidden channels, heads and neurons (teacher indices)
    and the importance scores.

    Raises :class:`ConfigError` for a layer map that does not fit the teacher, ``architecture="distilbert"`` with
    a teacher that is not BERT-shaped (absolute positions, BERT block layout), and for ``init="prune"``: targets
    larger than the teacher's, a head size other than the teacher's, no calibration sample (``student.init``) or an
    empty one (``student.calibration_sequences``). ``TypeError`` when ``teacher`` is not a Hugging Face
    ``PreTrainedModel``. ``cfg`` is trusted: it was validated when the run config was loaded
    (:func:`pretrain.schema.from_dict`).
    """
    model = pretrained(teacher)
    n_teacher = model.config.num_hidden_layers
    family = family_of(model)
    layer_map = teacher_layer_map(cfg.layers, model.config)
    if cfg.init != "random":
        family.check_copied_map(layer_map)
    if cfg.init == "random":
        student, record = _build_random(model, cfg, layer_map)
    elif cfg.init == "prune":
        student, record = build_pruned(
            model,
            layer_map,
            calibration,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
        )
    elif cfg.architecture == "distilbert":
        student, record = _build_distilbert(model, layer_map)
    else:
        student, record = _build_same(model, layer_map)
    record.update(
        architecture=cfg.architecture,
        init=cfg.init,
        teacher_layers=n_teacher,
        teacher_class=type(model).__name__,
        student_class=type(student).__name__,
    )
    return student.float().train(), record


def _build_same(teacher: PreTrainedModel, layer_map: list[int]) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Teacher's class with ``len(layer_map)`` layers; every tensor copied (layer i from teacher layer map[i])."""
    family = family_of(teacher)
    config = family.student_config(teacher.config, layer_map)
    student = new_like(type(teacher), config, base_model(teacher), student_attn_implementation(type(teacher), teacher))
    t_name, _ = family.layer_list(teacher)
    s_name, _ = family.layer_list(student)
    if s_name != t_name:
        raise ValueError(f"layer list found at {s_name!r} in the student but {t_name!r} in the teacher")
    prefix = t_name + "."
    t_state = teacher.state_dict()
    new_state, copied = {}, {}
    for key, value in student.state_dict().items():
        src = key
        if key.startswith(prefix):
            idx, rest = key[len(prefix) :].split(".", 1)
            src = f"{prefix}{layer_map[int(idx)]}.{rest}"
        if src not in t_state or t_state[src].shape != value.shape:
            raise ValueError(f"student tensor {key} {tuple(value.shape)} has no teacher counterpart {src}")
        new_state[key] = t_state[src].detach().to(torch.float32)
        copied[key] = src
    student.load_state_dict(new_state, strict=True)
    return student, {"layer_map": layer_map, "copied": copied, "initialized": [], "notes": []}


def _bert_embeddings(teacher: PreTrainedModel) -> nn.Module:
    """The BERT embeddings module the DistilBERT conversion reads; ConfigError when the teacher is not
    BERT-shaped (absolute positions, token-type embeddings, hidden_act gelu or relu)."""
    base = base_model(teacher)
    emb = getattr(base, "embeddings", None)
    need = ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")
    ok = isinstance(emb, nn.Module) and all(hasattr(emb, n) for n in need)
    ok = ok and not hasattr(emb, "create_position_ids_from_input_ids")  # RoBERTa-style offset positions
    ok = ok and not hasattr(base, "embeddings_project")  # ELECTRA with embedding_size != hidden_size
    ok = ok and getattr(teacher.config, "position_embedding_type", "absolute") == "absolute"
    if not ok or not isinstance(emb, nn.Module):
        raise ConfigError(
            f"student.architecture: 'distilbert' needs a BERT teacher (absolute positions, token-type embeddings); "
            f"{type(teacher).__name__} is not one. Use student.architecture='same' (for RoBERTa this gives the "
            f"DistilRoBERTa architecture)"
        )
    act = teacher.config.hidden_act
    if act not in ("gelu", "relu"):
        raise ConfigError(
            f"student.architecture: 'distilbert' supports hidden_act gelu or relu, the teacher has "
            f"{act!r}; use student.architecture='same'"
        )
    return emb


# DistilBERT block module <- BERT block module (weight and bias of each)
DISTILBERT_BLOCK = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}


class _StateCopy:
    """A student state dict filled from a teacher's (fp32 copies), with where each tensor came from."""

    def __init__(self, teacher_state: dict[str, torch.Tensor]):
        self.teacher = teacher_state
        self.state: dict[str, torch.Tensor] = {}
        self.copied: dict[str, str] = {}

    def put(self, s_key: str, t_key: str, value: torch.Tensor | None = None, how: str | None = None) -> None:
        """Student ``s_key`` <- teacher ``t_key`` (or ``value`` computed from it, recorded as ``how``)."""
        self.state[s_key] = (self.teacher[t_key] if value is None else value).detach().to(torch.float32).clone()
        self.copied[s_key] = how or t_key


def _distilbert_config(tc: PreTrainedConfig, n_layers: int) -> DistilBertConfig:
    """The DistilBERT config of a BERT teacher's sizes with ``n_layers`` layers (learned positions, as BERT)."""
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=tc.vocab_size,
        max_position_embeddings=tc.max_position_embeddings,
        sinusoidal_pos_embds=False,
        n_layers=n_layers,
        n_heads=tc.num_attention_heads,
        dim=tc.hidden_size,
        hidden_dim=tc.intermediate_size,
        dropout=tc.hidden_dropout_prob,
        attention_dropout=tc.attention_probs_dropout_prob,
        activation=tc.hidden_act,
        initializer_range=tc.initializer_range,
        pad_token_id=tc.pad_token_id,
        tie_word_embeddings=getattr(tc, "tie_word_embeddings", True),
    )


def _copy_distilbert_embeddings(c: _StateCopy, e: str, s_prefix: str) -> None:
    """Word embeddings and LayerNorm copied; positions absorb the type-0 token-type embedding (``e``: the teacher's
    embeddings prefix)."""
    c.put(f"{s_prefix}embeddings.word_embeddings.weight", e + "word_embeddings.weight")
    fold = (
        c.teacher[e + "position_embeddings.weight"].float() + c.teacher[e + "token_type_embeddings.weight"][0].float()
    )
    c.put(
        f"{s_prefix}embeddings.position_embeddings.weight",
        e + "position_embeddings.weight",
        fold,
        f"{e}position_embeddings.weight + {e}token_type_embeddings.weight[0]",
    )
    for p in ("weight", "bias"):
        c.put(f"{s_prefix}embeddings.LayerNorm.{p}", f"{e}LayerNorm.{p}")


def _copy_distilbert_blocks(c: _StateCopy, t_layers_name: str, layer_map: list[int], s_prefix: str) -> None:
    """Student block i <- teacher block ``layer_map[i]`` (:data:`DISTILBERT_BLOCK`); ConfigError for a teacher
    block without BERT's layout."""
    for i, t_i in enumerate(layer_map):
        for s_mod, t_mod in DISTILBERT_BLOCK.items():
            for p in ("weight", "bias"):
                t_key = f"{t_layers_name}.{t_i}.{t_mod}.{p}"
                if t_key not in c.teacher:
                    raise ConfigError(
                        f"student.architecture: 'distilbert' needs BERT's block layout; the teacher has "
                        f"no {t_key}. Use student.architecture='same'"
                    )
                c.put(f"{s_prefix}transformer.layer.{i}.{s_mod}.{p}", t_key)


def _copy_distilbert_head(c: _StateCopy, h: str, teacher_class: str) -> None:
    """BERT's MLM head (``h``: its prefix, ``cls.predictions.``) -> DistilBERT's vocab_transform / vocab_layer_norm
    / vocab_projector; ConfigError for another head."""
    if h + "transform.dense.weight" not in c.teacher:
        raise ConfigError(
            f"student.architecture: 'distilbert' needs BERT's MLM head (cls.predictions); "
            f"{teacher_class} has another. Use student.architecture='same'"
        )
    for p in ("weight", "bias"):
        c.put(f"vocab_transform.{p}", f"{h}transform.dense.{p}")
        c.put(f"vocab_layer_norm.{p}", f"{h}transform.LayerNorm.{p}")
        c.put(f"vocab_projector.{p}", f"{h}decoder.{p}")


def _distilbert_notes(teacher: PreTrainedModel) -> list[str]:
    """What the DistilBERT conversion changes, for the record."""
    tc = teacher.config
    notes = ["token_type_embeddings[0] folded into position_embeddings (DistilBERT has no token types)"]
    if getattr(base_model(teacher), "pooler", None) is not None:
        notes.append("teacher pooler dropped (DistilBERT has none)")
    if abs(getattr(tc, "layer_norm_eps", 1e-12) - 1e-12) > 1e-15:
        notes.append(f"teacher layer_norm_eps={tc.layer_norm_eps}, DistilBERT uses 1e-12: outputs differ slightly")
    return notes


def _build_distilbert(teacher: PreTrainedModel, layer_map: list[int]) -> tuple[PreTrainedModel, dict[str, Any]]:
    """BERT -> DistilBERT with the weights mapped; positions absorb the type-0 token-type embedding."""
    from transformers import DistilBertForMaskedLM, DistilBertModel

    emb = _bert_embeddings(teacher)
    head = mlm_head(teacher)
    config = _distilbert_config(teacher.config, len(layer_map))
    cls = DistilBertForMaskedLM if head is not None else DistilBertModel
    student = new_like(cls, config, attn=student_attn_implementation(cls, teacher))
    s_prefix = "distilbert." if head is not None else ""
    t_names = {id(m): n for n, m in teacher.named_modules()}
    t_layers_name, _ = find_layer_list(teacher)
    c = _StateCopy(teacher.state_dict())
    _copy_distilbert_embeddings(c, t_names[id(emb)] + ".", s_prefix)
    _copy_distilbert_blocks(c, t_layers_name, layer_map, s_prefix)
    if head is not None:  # a head of sibling modules (ELECTRA's generator) has no name: not BERT's cls.predictions
        _copy_distilbert_head(c, t_names.get(id(head), "<no module>") + ".", type(teacher).__name__)
    missing = sorted(set(student.state_dict()) - set(c.state))
    if missing:
        raise ValueError(f"DistilBERT conversion left tensors unmapped: {missing}")
    student.load_state_dict(c.state, strict=True)
    record = {"layer_map": layer_map, "copied": c.copied, "initialized": [], "notes": _distilbert_notes(teacher)}
    return student, record


def _build_random(
    teacher: PreTrainedModel, cfg: StudentConfig, layer_map: list[int]
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A freshly initialised student (TinyBERT / MiniLM style) of the configured sizes; nothing copied."""
    tc = teacher.config
    hidden = cfg.hidden_size or tc.hidden_size
    head_dim = tc.hidden_size // tc.num_attention_heads
    heads = cfg.num_attention_heads or (hidden // head_dim if hidden % head_dim == 0 else tc.num_attention_heads)
    if hidden % heads:
        raise ConfigError(
            f"student.num_attention_heads: {heads} does not divide student.hidden_size={hidden}; "
            f"set student.num_attention_heads"
        )
    family = family_of(teacher)
    inter = cfg.intermediate_size or round(family.intermediate_size(tc) * hidden / tc.hidden_size)
    depth = cfg.num_hidden_layers or len(layer_map)
    if depth != len(layer_map):
        if not isinstance(cfg.layers, str):
            raise ConfigError(
                f"student.layers: {len(layer_map)} layers listed but student.num_hidden_layers={depth};"
                f" make them agree or drop one"
            )
        n = tc.num_hidden_layers  # TinyBERT's uniform map g(m) = m * N / M, as 0-based layer indices
        layer_map = [max(0, math.floor((i + 1) * n / depth + 0.5) - 1) for i in range(depth)]
    config: PreTrainedConfig
    if cfg.architecture == "distilbert":
        from transformers import DistilBertConfig, DistilBertForMaskedLM, DistilBertModel

        _bert_embeddings(teacher)
        config = DistilBertConfig(
            vocab_size=tc.vocab_size,
            max_position_embeddings=tc.max_position_embeddings,
            n_layers=depth,
            n_heads=heads,
            dim=hidden,
            hidden_dim=inter,
            dropout=tc.hidden_dropout_prob,
            attention_dropout=tc.attention_probs_dropout_prob,
            activation=tc.hidden_act,
            initializer_range=tc.initializer_range,
            pad_token_id=tc.pad_token_id,
        )
        cls = DistilBertForMaskedLM if mlm_head(teacher) is not None else DistilBertModel
        student = new_like(cls, config, attn=student_attn_implementation(cls, teacher))
    else:
        config = family.student_config(tc, layer_map)  # per-layer fields follow the mapped layers
        if getattr(config, "embedding_size", None) == tc.hidden_size:
            config.embedding_size = hidden
        family.set_sizes(config, hidden, heads, inter)  # under the family's names (DistilBERT: dim, hidden_dim)
        config.num_hidden_layers = depth
        attn = student_attn_implementation(type(teacher), teacher)
        student = new_like(type(teacher), config, base_model(teacher), attn)
    return student, {
        "layer_map": layer_map,
        "copied": {},
        "initialized": sorted(student.state_dict()),
        "notes": [f"random init: {depth} layers, hidden {hidden}, {heads} heads, intermediate {inter}"],
    }


def freeze_unused(student: nn.Module) -> list[str]:
    """Freeze the student's parameters that no distillation loss reaches, so the optimizer does not carry them:
    the pooler (``pooler.*``, copied from the teacher and exported as it is, so that ``pooler_output`` is the
    teacher's). Returns the frozen parameter names."""
    frozen = [n for n, p in student.named_parameters() if n.split(".")[0] == "pooler" or ".pooler." in n]
    for name, tensor in student.named_parameters():
        if name in frozen:
            tensor.requires_grad_(False)
    return frozen
