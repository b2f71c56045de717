"""The distillation module: frozen teacher + student + losses in one ``nn.Module`` that DeepSpeed can wrap.

Compute only what the losses read (docs/performance.md): the teacher runs under ``no_grad`` and returns hidden states
only when an intermediate loss needs them; the LM heads (transform + decoder) of teacher and student run only on the
positions the KL / MLM terms read, gathered first (``naive=True`` keeps the plain way: full-vocabulary logits at every
position, then select; for tests and benchmarks). MiniLM's relation terms read the queries / keys / values of the mapped
layers through forward hooks on the self-attention projections, so SDPA attention (which returns no probabilities) can
stay on.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import losses as L
from pretrain.families import QKVSource, family_of, tap_qkv
from pretrain.schema import ConfigError
from pretrain.structure import model_config
from pretrain.student import base_model, mlm_head

if TYPE_CHECKING:
    from transformers import PreTrainedModel

VOCAB_MULTIPLE = 64  # on CUDA the LM heads' vocabulary products run padded to a multiple of this (aligned_vocab)


def default_layer_pairs(layer_map: list[int], num_teacher_layers: int) -> list[list[int]]:
    """[student, teacher] hidden-state index pairs (0 = embeddings output, k = output of layer k, 1-based).

    Student layer i (1-based) <-> the teacher hidden state that fed the teacher layer copied into student layer i+1,
    i.e. ``teacher index = layer_map[i]``; the last student layer <-> the teacher's last hidden state. For
    ``every_other`` this is TinyBERT's uniform map (k <-> 2k); for DistilBERT's [0, 2, 4, 7, 9, 11] it is
    (1, 2), (2, 4), (3, 7), (4, 9), (5, 11), (6, 12).
    """
    m = len(layer_map)
    return [[i, layer_map[i]] for i in range(1, m)] + [[m, num_teacher_layers]]


def find_qkv(model: nn.Module, index: int) -> QKVSource:
    """Where block ``index`` (0-based) of ``model`` computes its queries, keys and values, asked of the model's
    family adapter (:meth:`pretrain.families.Family.qkv_source`): separate projections (BERT / RoBERTa / ELECTRA
    ``query/key/value``, DistilBERT ``q_lin/k_lin/v_lin``, DeBERTa ``query_proj/key_proj/value_proj``, MPNet
    ``q/k/v``) or ModernBERT's fused ``Wqkv`` (split in three, Q / K rotated as the model does: taken after RoPE;
    :mod:`pretrain.families` says why). Raises ``ValueError`` when the block has none."""
    family = family_of(model)
    _, blocks = family.layer_list(model)
    return family.qkv_source(blocks[index], int(model_config(model).num_attention_heads))


class _Captured(dict):
    """The Q / K / V captured in one forward, keyed ``(who, pair, j)``; a missing entry is a clear error."""

    def __missing__(self, key: tuple[str, int, int]) -> torch.Tensor:
        who = {"s": "student", "t": "teacher"}.get(key[0], key[0])
        raise RuntimeError(
            f"the relation losses (loss.alpha_att / alpha_val) received no {'QKV'[key[2]]} from the {who}'s relation "
            f"pair {key[1]}: its attention projections did not run in this forward (a compiled or replaced "
            f"attention module?); refusing to compute the term from nothing"
        )


def vocab_projection(head, vocab_size: int) -> nn.Linear | None:
    """The vocabulary projection of an MLM head (:func:`pretrain.student.mlm_head`): its last ``nn.Linear`` with
    ``out_features == vocab_size``, or None."""
    found = None
    parts = getattr(head, "mods", None) or [head]  # pretrain.student._Chain keeps its (unregistered) parts in .mods
    for part in parts:
        for module in part.modules() if isinstance(part, nn.Module) else ():
            if isinstance(module, nn.Linear) and module.out_features == vocab_size:
                found = module
    return found


@contextlib.contextmanager
def aligned_vocab(linear: nn.Linear | None, multiple: int = VOCAB_MULTIPLE):
    """While active, ``linear`` computes its product with the output dimension padded with zero rows to a multiple of
    ``multiple`` and returns the first ``out_features`` columns (a view): the same values, gradients included.

    Why: with an odd vocabulary (RoBERTa's 50,265) the logits' row stride is not 16-byte aligned and cuBLAS falls back
    to slow GEMM kernels (on an H100 an sm75 kernel; 1.11-1.14x tokens/s with the padding, docs/performance.md);
    nanoGPT pads its vocabulary for the same reason. The pad is a copy of the weight per call (``vocab x hidden``,
    small next to the products on a GPU). No-op for None or an aligned ``out_features``. :class:`DistillationModel`
    uses it on CUDA only: on CPU (MKL) it measured 0.88-1.07x.
    """
    if linear is None or (-linear.out_features) % multiple == 0:
        yield
        return
    lin, pad = linear, (-linear.out_features) % multiple

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = F.pad(lin.weight, (0, 0, 0, pad))
        b = None if lin.bias is None else F.pad(lin.bias, (0, pad))
        return F.linear(x, w, b)[..., : lin.out_features]

    vars(lin)["forward"] = forward  # an instance attribute shadows the class's forward; hooks still run
    try:
        yield
    finally:
        del vars(lin)["forward"]


def init_from_channels(linear: nn.Linear, channels: list[int]) -> nn.Linear:
    """Initialise a TinyBERT projection ``Linear(student_hidden, teacher_hidden)`` of a width-pruned student from
    its channel selection: ``weight[channels[j], j] = 1`` for every student channel j, every other weight 0, bias 0.

    ``channels``: the teacher hidden channel each student channel was cut from (``student_hidden`` distinct indices
    in ``0..teacher_hidden-1``; :mod:`pretrain.prune` keeps them sorted). The rows of the kept channels then form
    the identity and the rows of the pruned channels are zero: at initialisation the projection maps the pruned
    student's hidden state back onto the teacher's kept channels and predicts zero for the pruned ones. Returns
    ``linear`` (modified in place). Raises ``ValueError`` when the indices do not fit its shape.
    """
    out_f, in_f = linear.weight.shape
    idx = [int(c) for c in channels]
    if len(idx) != in_f or len(set(idx)) != len(idx) or not all(0 <= c < out_f for c in idx):
        raise ValueError(
            f"hidden_channels: {len(idx)} indices (distinct, in 0..{out_f - 1}) expected for a "
            f"projection {in_f} -> {out_f}"
        )
    with torch.no_grad():  # not a decorator: mutmut does not mutate decorated functions
        linear.weight.zero_()
        linear.weight[torch.tensor(idx), torch.arange(in_f)] = 1.0
        if linear.bias is not None:
            linear.bias.zero_()
    return linear


def logit_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ce: bool,
    mlm: bool,
) -> dict[str, torch.Tensor]:
    """The logit terms on the gathered rows: ``{"ce": kd_kl, "mlm": mlm_ce}`` (those asked for).

    Args: student_logits, teacher_logits [N, V] (any float dtype; the losses compute in fp32); labels Long [N].
    One function so that ``train.compile`` can fuse the fp32 softmaxes over the vocabulary into few kernels.
    """
    parts = {}
    if ce:
        parts["ce"] = L.kd_kl(student_logits, teacher_logits, temperature)
    if mlm:
        parts["mlm"] = L.mlm_ce(student_logits, labels)
    return parts


class DistillationModel(nn.Module):
    """Student + frozen teacher + the configured losses.

    Args:
        student: Hugging Face student (from :func:`pretrain.student.build_student`); trained.
        teacher: Hugging Face teacher, frozen here (``eval()``, ``requires_grad_(False)``), run under ``no_grad``.
            It is not a registered submodule: ``parameters()`` / ``state_dict()`` hold only the student and the
            projections, and ``.to()`` does not move it (use :meth:`move_teacher`). It may be fp16 / bf16.
        loss_cfg: the loss section.
        layer_map: student layer i was taken from teacher layer ``layer_map[i]`` (0-based; the ``layer_map`` of
            ``build_student``'s record); gives the default layer pairs.
        naive: full-vocabulary logits at every position, then select (reference path for tests / benchmarks).
        hidden_channels: for a width-pruned student (``student.init="prune"``, the ``prune.hidden_channels`` of
            ``build_student``'s record): the teacher hidden channel each student channel was cut from, in order
            (``student_hidden`` sorted indices into ``0..teacher_hidden-1``). The projections then start from that
            selection (:func:`init_from_channels`): weight ``[teacher_hidden, student_hidden]`` with
            ``W[hidden_channels[j], j] = 1`` and zeros elsewhere, bias zero, so at initialisation a projection puts
            each student channel back on the teacher channel it came from and zeros on the pruned ones. None: the
            projections keep ``nn.Linear``'s random initialisation (TinyBERT; a random student), unless the student
            carries ``pruned_hidden_channels`` (set by :func:`pretrain.prune.build_pruned`), which is then used.

    Attributes: ``student``; ``projections`` (``nn.ModuleDict`` of TinyBERT-style ``Linear(student_hidden,
    teacher_hidden)`` keyed ``"h<student index>"``, or None when widths agree or no hidden loss is on; initialised
    from ``hidden_channels`` when given);
    ``layer_pairs``; ``relation_pairs`` ([student layer, teacher layer], 0-based, for the relation terms).

    Raises :class:`ConfigError` for different vocabularies, layer pairs out of range
    or relation heads that do not divide both widths; ``ValueError`` for ``hidden_channels`` that do not fit the
    widths.
    """

    _teacher: PreTrainedModel  # set with object.__setattr__: not a submodule

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel,
        loss_cfg: L.LossConfig,
        layer_map: list[int],
        *,
        naive: bool = False,
        hidden_channels: list[int] | None = None,
    ):
        super().__init__()
        self.student = student
        object.__setattr__(self, "_teacher", teacher)  # not a submodule: DeepSpeed must not train / save it
        teacher.eval().requires_grad_(False)
        self.loss_cfg, self.layer_map, self.naive = loss_cfg, list(layer_map), naive
        active = loss_cfg.active()
        sc, tc = student.config, teacher.config
        if ("ce" in active or "mlm" in active) and sc.vocab_size != tc.vocab_size:
            raise ConfigError(f"loss.alpha_ce: student vocabulary {sc.vocab_size} != teacher's {tc.vocab_size}")
        n_s, n_t = sc.num_hidden_layers, tc.num_hidden_layers
        self.layer_pairs = [list(p) for p in (loss_cfg.layer_pairs or default_layer_pairs(self.layer_map, n_t))]
        for s, t in self.layer_pairs:
            if not (0 <= s <= n_s and 0 <= t <= n_t):
                raise ConfigError(
                    f"loss.layer_pairs: [{s}, {t}] out of range: the student has hidden states 0..{n_s},"
                    f" the teacher 0..{n_t}"
                )
        self.projections = self._make_projections(active, hidden_channels)
        self.relation_heads: int = loss_cfg.relation_heads or sc.num_attention_heads
        self.relation_pairs: list[list[int]] = []
        self._qkv_s: list[QKVSource] = []  # plain lists: not registered
        self._qkv_t: list[QKVSource] = []
        if "att" in active or "val" in active:
            self._find_relations()
        self._heads = (mlm_head(teacher), mlm_head(student))
        self._projections_v = [None if h is None else vocab_projection(h, tc.vocab_size) for h in self._heads]
        self._logit_losses = logit_losses
        # the heads' vocabulary products padded to a multiple of this (aligned_vocab); None: VOCAB_MULTIPLE on CUDA,
        # unpadded on CPU; 1: never (benchmark ablation)
        self.vocab_multiple: int | None = None

    def _make_projections(self, active: dict[str, float], hidden_channels: list[int] | None) -> nn.ModuleDict | None:
        """TinyBERT projections ``Linear(student_hidden, teacher_hidden)`` for the student hidden states the hidden
        losses read, when the widths differ (None otherwise); from ``hidden_channels`` (or the student's
        ``pruned_hidden_channels``) when given (:func:`init_from_channels`)."""
        sc, tc, n_s = self.student.config, self._teacher.config, self.student.config.num_hidden_layers
        used: set[int] = set()
        if "cos" in active:
            used |= {s for s, _ in self.layer_pairs} if self.loss_cfg.cos_layers == "pairs" else {n_s}
        if "mse" in active:
            used |= {s for s, _ in self.layer_pairs}
        if "pool" in active:
            used.add(n_s)
        if not used or sc.hidden_size == tc.hidden_size:
            return None
        linears = {f"h{s}": nn.Linear(sc.hidden_size, tc.hidden_size) for s in sorted(used)}
        if hidden_channels is None:
            hidden_channels = getattr(self.student, "pruned_hidden_channels", None)
        if hidden_channels is not None:
            for proj in linears.values():
                init_from_channels(proj, hidden_channels)
        return nn.ModuleDict(linears)

    def _find_relations(self) -> None:
        """MiniLM relations: the layer pairs (``loss.relation_layers``: the last layers, or the hidden-state pairs)
        and their Q / K / V modules; raises :class:`ConfigError` when ``relation_heads`` does not divide a width."""
        n_s, n_t = self.student.config.num_hidden_layers, self._teacher.config.num_hidden_layers
        if self.loss_cfg.relation_layers == "last":
            self.relation_pairs = [[n_s - 1, n_t - 1]]
        else:
            self.relation_pairs = [[s - 1, t - 1] for s, t in self.layer_pairs if s > 0 and t > 0]
        for model, who in ((self.student, "student"), (self._teacher, "teacher")):
            width = model.config.hidden_size
            if width % self.relation_heads:
                raise ConfigError(
                    f"loss.relation_heads: {self.relation_heads} does not divide the {who} width "
                    f"{width}; set loss.relation_heads to a common divisor of both widths"
                )
        self._qkv_s = [find_qkv(self.student, s) for s, _ in self.relation_pairs]
        self._qkv_t = [find_qkv(self._teacher, t) for _, t in self.relation_pairs]

    def compile_parts(self) -> None:
        """``torch.compile`` the student's and the teacher's encoders (in place: parameter names, checkpoints and
        exports unchanged) and the logit losses (:func:`logit_losses`, dynamic row count)."""
        for module in (base_model(self.student), base_model(self._teacher)):
            module.compile()
        self._logit_losses = torch.compile(logit_losses, dynamic=True)
        self._compiled = {m: m._compiled_call_impl for m in (base_model(self.student), base_model(self._teacher))}

    def compiled_modules(self) -> list[str]:
        """Which encoders run compiled now: a sublist of ``["student", "teacher"]``."""
        on = getattr(self, "_compiled", {})
        return [
            n
            for n, m in (("student", base_model(self.student)), ("teacher", base_model(self._teacher)))
            if m in on and m._compiled_call_impl is not None
        ]

    def set_compiled(self, enabled: bool) -> None:
        """Run the encoders compiled (after :meth:`compile_parts`) or eagerly, without recompiling (a benchmark's
        eager-attention modes run uncompiled). ``nn.Module.compile`` keeps its compiled callable in
        ``_compiled_call_impl``; this is the one place that switches it."""
        for module, impl in getattr(self, "_compiled", {}).items():
            module._compiled_call_impl = impl if enabled else None

    def set_paths(self, *, naive: bool, vocab_multiple: int | None) -> None:
        """Switch how the logit terms run: ``naive`` = full-vocabulary logits at every position, then select (the
        reference path); ``vocab_multiple`` = pad the heads' vocabulary products to this multiple (None: 64 on CUDA,
        unpadded on CPU; 1: never, :func:`aligned_vocab`). The losses' values are the same either way."""
        self.naive, self.vocab_multiple = naive, vocab_multiple

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a submodule)."""
        return self._teacher

    def move_teacher(self, device, dtype: torch.dtype | None = None) -> None:
        """Move the teacher (for example to the GPU in fp16: the teacher only runs forward)."""
        teacher: nn.Module = self._teacher  # nn.Module.to's signature (transformers types its override as a wrapper)
        teacher.to(device=device, dtype=dtype)

    @contextlib.contextmanager
    def _capture_qkv(self):
        """Forward hooks on the mapped layers' Q / K / V projections (:func:`pretrain.families.tap_qkv`) for the
        duration of one forward; the store maps ``(who, pair, j)`` to Q (j=0), K (1) or V (2) [B, L, D]."""
        store = _Captured()
        handles = []
        if self.relation_pairs:
            for who, sources in (("s", self._qkv_s), ("t", self._qkv_t)):
                for i, src in enumerate(sources):

                    def put(j: int, out: torch.Tensor, who: str = who, i: int = i) -> None:
                        store[who, i, j] = out

                    handles += tap_qkv(src, put)
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    def _run(self, model: nn.Module, input_ids, attention_mask, hidden_states: bool, full_logits: bool):
        """(last hidden [B, L, H], hidden states tuple or None, full logits [B, L, V] or None)."""
        if full_logits:
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            return out.hidden_states[-1], out.hidden_states, out.logits
        out = base_model(model)(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_states)
        return out.last_hidden_state, (out.hidden_states if hidden_states else None), None

    def _proj(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.projections is None else self.projections[f"h{index}"](hidden)

    def _representation_terms(self, active, s_last, t_last, s_hs, t_hs, attention_mask, qkv) -> dict[str, torch.Tensor]:
        """The hidden-state and relation terms that are active: ``cos`` (last layer or the layer pairs), ``mse`` (layer
        pairs), ``pool`` (mean-pooled last layer), ``att`` / ``val`` (MiniLM relations from the captured Q / K / V).
        ``s_last`` / ``t_last`` [B, L, H]; ``s_hs`` / ``t_hs`` the hidden-state tuples (None unless a pair term needs
        them); the student's go through the TinyBERT projections when the widths differ."""
        cfg, n_s, parts = self.loss_cfg, self.student.config.num_hidden_layers, {}
        if "cos" in active:
            if cfg.cos_layers == "last":
                parts["cos"] = L.hidden_cosine(self._proj(n_s, s_last), t_last, attention_mask)
            else:
                parts["cos"] = torch.stack(
                    [L.hidden_cosine(self._proj(s, s_hs[s]), t_hs[t], attention_mask) for s, t in self.layer_pairs]
                ).mean()
        if "mse" in active:
            parts["mse"] = torch.stack(
                [L.hidden_mse(self._proj(s, s_hs[s]), t_hs[t], attention_mask) for s, t in self.layer_pairs]
            ).mean()
        if "pool" in active:
            parts["pool"] = L.pooled_mse(self._proj(n_s, s_last), t_last, attention_mask)
        r = self.relation_heads
        if "att" in active:
            parts["att"] = torch.stack(
                [
                    L.attention_kl(qkv["s", i, 0], qkv["s", i, 1], qkv["t", i, 0], qkv["t", i, 1], attention_mask, r)
                    for i in range(len(self.relation_pairs))
                ]
            ).mean()
        if "val" in active:
            parts["val"] = torch.stack(
                [
                    L.value_relation_kl(qkv["s", i, 2], qkv["t", i, 2], attention_mask, r)
                    for i in range(len(self.relation_pairs))
                ]
            ).mean()
        return parts

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One distillation forward.

        Args:
            input_ids: Long [B, L] masked token ids (from :class:`pretrain.masking.Masker`).
            attention_mask: [B, L], 1 = real token. labels: Long [B, L], original id at masked positions, else -100.

        Returns:
            ``(loss, logs)``: loss 0-dim fp32 with grad (sum of alpha x term); logs: detached 0-dim tensors "loss",
            "loss_<term>" for each active term, "n_masked" (masked tokens) and "n_tokens" (non-pad tokens). No host
            sync except one: the number of gathered rows (``nonzero``), once per forward.
        """
        cfg = self.loss_cfg
        active = cfg.active()
        need_logits = "ce" in active or "mlm" in active
        need_all = "mse" in active or ("cos" in active and cfg.cos_layers == "pairs")
        full = self.naive and need_logits
        with self._capture_qkv() as qkv:
            with torch.no_grad():
                t_last, t_hs, t_logits = self._run(self._teacher, input_ids, attention_mask, need_all, full)
            s_last, s_hs, s_logits = self._run(self.student, input_ids, attention_mask, need_all, full)
        parts: dict[str, torch.Tensor] = {}
        if need_logits:
            pos = labels != -100
            if not cfg.restrict_ce_to_mask:
                pos = pos | attention_mask.bool()
            idx = pos.flatten().nonzero().squeeze(1)  # the forward's one host sync (the row count) [N]

            def rows(x: torch.Tensor) -> torch.Tensor:  # [B, L, ...] -> [N, ...], the positions the losses read
                return x.flatten(0, 1).index_select(0, idx)

            if full:
                s_sel, t_sel = rows(s_logits), rows(t_logits)
            else:
                (t_head, s_head), (t_proj, s_proj) = self._heads, self._projections_v
                multiple = self.vocab_multiple or (VOCAB_MULTIPLE if s_last.is_cuda else 1)
                with torch.no_grad(), aligned_vocab(t_proj, multiple):
                    t_sel = t_head(rows(t_last))
                with aligned_vocab(s_proj, multiple):
                    s_sel = s_head(rows(s_last))
            parts.update(
                self._logit_losses(
                    s_sel,
                    t_sel,
                    labels.flatten().index_select(0, idx),
                    cfg.temperature,
                    "ce" in active,
                    "mlm" in active,
                )
            )
        parts.update(self._representation_terms(active, s_last, t_last, s_hs, t_hs, attention_mask, qkv))
        loss, logs = L.combine_losses(cfg, parts)
        logs["n_masked"] = (labels != -100).sum().detach()
        logs["n_tokens"] = attention_mask.sum().detach()
        return loss, logs
