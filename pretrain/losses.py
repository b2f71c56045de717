"""Distillation losses: pure functions over tensors, and their weighted combination.

Sources: DistilBERT (Sanh et al., 2019: soft-target KL with temperature, MLM, hidden-state cosine), TinyBERT (Jiao et
al., 2020, sec. 3.1: hidden-state MSE through a learned projection, attention-based distillation), MiniLM (Wang et al.,
2020, sec. 3.1-3.2: KL between self-attention distributions and between value relations of the last layer; MiniLMv2's
relation heads, Wang et al. 2021), and sentence-transformers' model distillation (Reimers & Gurevych, 2020: MSE between
sentence embeddings). Every function computes in fp32 whatever the input dtype and returns a 0-dim fp32 tensor; none
syncs with the host.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from pretrain.schema import ConfigError, check, param

TERMS = ("ce", "mlm", "cos", "mse", "att", "val", "pool", "label", "prob_cos")
TASK_TERMS = ("label", "prob_cos")  # only in task distillation (the task section); "mlm" never there
_NEG = -1e9  # finite "minus infinity" for masked keys: exp() is exactly 0 and 0 * finite stays 0 in the KL


@dataclasses.dataclass
class LossConfig:
    """Loss weights and options (total = sum of alpha_x * loss_x over the terms with alpha_x > 0)."""

    alpha_ce: float = param(
        5.0,
        help="Weight of the soft-target KL to the teacher's MLM distribution x T^2. 5.0: "
        "the --alpha_ce of the training command in Hugging Face's research_projects/"
        "distillation README (train.py's own default is 0.5). Needs an MLM head. In task "
        "distillation: the KL between the class distributions (MSE between the "
        "outputs for regression).",
    )
    alpha_mlm: float = param(
        2.0,
        help="Weight of the student's MLM cross-entropy on the masked tokens. 2.0: that "
        "command's --alpha_mlm (train.py's default 0.0). Needs an MLM head.",
    )
    alpha_cos: float = param(
        1.0,
        help="Weight of 1 - cosine between student and teacher hidden states over non-pad "
        "tokens. 1.0: that command's --alpha_cos (train.py's default 0.0); last layer "
        "as in its distiller.py.",
    )
    alpha_mse: float = param(
        0.0,
        help="Weight of the hidden-state MSE over the layer pairs (TinyBERT's representation loss), mean over pairs.",
    )
    alpha_att: float = param(
        0.0,
        help="Weight of the KL between teacher and student self-attention distributions "
        "(MiniLM), see relation_layers / relation_heads.",
    )
    alpha_val: float = param(0.0, help="Weight of the KL between teacher and student value relations (MiniLM).")
    alpha_pool: float = param(
        0.0,
        help="Weight of the MSE between mean-pooled sentence embeddings (Reimers & "
        "Gurevych 2020), for sentence-encoder teachers.",
    )
    alpha_label: float = param(
        0.0,
        help="Task distillation only: weight of the student's loss on the gold labels "
        "(cross-entropy; MSE for regression tasks).",
    )
    alpha_prob_cos: float = param(
        0.0,
        help="Task distillation only: weight of 1 - cosine between the teacher's and the student's class-"
        "probability distributions at temperature T (the cosine term of the Distillator recipe, "
        "docs/task-distillation.md).",
    )
    temperature: float = param(
        2.0,
        help="Softmax temperature T of the KL term, which is scaled by T^2 "
        "(2.0: train.py's default, not changed by the README command).",
    )
    restrict_ce_to_mask: bool = param(
        True,
        help="true: the KL term on the masked positions only; false: on every non-pad position, [CLS] / [SEP] "
        "included, which is what the Hugging Face reference runs (train.py's --restrict_ce_to_mask flag "
        "is off by default and its README command does not pass it). The project keeps true: the LM heads "
        "then run on the ~15% masked positions only (a head's vocabulary product costs about 5 encoder "
        "layers per position for roberta-base, so a third fewer FLOPs per step for roberta-base -> 6 "
        "layers), and the masked positions are where the teacher's distribution says more than the visible "
        "token.",
    )
    layer_pairs: list[list[int]] | None = param(
        None,
        help="[student, teacher] hidden-state indices for the intermediate losses (0 = embeddings output, "
        "k = output of layer k, 1-based). null = from the student's layer map: student layer i's output "
        "<-> the teacher hidden state that fed the teacher layer copied into student layer i+1, the last "
        "student layer <-> the teacher's last (TinyBERT's uniform map for every_other).",
    )
    cos_layers: str = param(
        "last",
        help='Cosine term on "last" (student last vs teacher last hidden state, '
        'DistilBERT) or on every layer pair ("pairs", mean over pairs).',
    )
    relation_layers: str = param(
        "last",
        help='Attention / value relation terms on "last" (last student layer vs '
        'last teacher layer, MiniLM) or on every layer pair ("pairs").',
    )
    relation_heads: int | None = param(
        None,
        help="Heads the queries / keys / values are split into for the relation terms (MiniLMv2). null = the "
        "student's attention heads; equal head counts give exactly the models' attention distributions.",
    )

    def validate(self) -> None:
        """Check ranges; raises :class:`ConfigError` naming ``loss.<key>``."""
        for name in TERMS:
            value = getattr(self, f"alpha_{name}")
            check(value >= 0 and math.isfinite(value), f"loss.alpha_{name}", f"{value} must be a finite number >= 0")
        check(
            any(getattr(self, f"alpha_{n}") > 0 for n in TERMS),
            "loss.alpha_ce",
            "every loss weight is 0; set at least one of " + ", ".join(f"alpha_{n}" for n in TERMS) + " > 0",
        )
        check(
            0 < self.temperature < math.inf,
            "loss.temperature",
            f"{self.temperature} must be a finite number > 0 (DistilBERT uses 2.0)",
        )
        if self.layer_pairs is not None:
            for i, pair in enumerate(self.layer_pairs):
                check(
                    len(pair) == 2 and all(isinstance(v, int) and v >= 0 for v in pair),
                    f"loss.layer_pairs[{i}]",
                    f"{pair!r} must be [student_index, teacher_index], non-negative hidden-state indices",
                )
            check(len(self.layer_pairs) > 0, "loss.layer_pairs", "is empty; use null for the default pairs")
        check(self.cos_layers in ("last", "pairs"), "loss.cos_layers", f"{self.cos_layers!r} is not 'last' or 'pairs'")
        check(
            self.relation_layers in ("last", "pairs"),
            "loss.relation_layers",
            f"{self.relation_layers!r} is not 'last' or 'pairs'",
        )
        if self.relation_heads is not None:
            check(self.relation_heads > 0, "loss.relation_heads", f"{self.relation_heads} must be a positive integer")

    def active(self) -> dict[str, float]:
        """The terms with a positive weight: ``{"ce": 5.0, "mlm": 2.0, "cos": 1.0}`` for the defaults."""
        return {n: getattr(self, f"alpha_{n}") for n in TERMS if getattr(self, f"alpha_{n}") > 0}

    def check_models(self, *, teacher_has_mlm_head: bool, student_has_mlm_head: bool, teacher_name: str = "") -> None:
        """Raise :class:`ConfigError` when a logit term is on but a model has no MLM head (e.g. a sentence encoder)."""
        for key in ("alpha_ce", "alpha_mlm"):
            value = getattr(self, key)
            if value > 0 and not (teacher_has_mlm_head and student_has_mlm_head):
                who = f"the teacher {teacher_name}".strip() if not teacher_has_mlm_head else "the student"
                raise ConfigError(
                    f"loss.{key}: {value} needs an MLM head but {who} has none; set loss.alpha_ce=0 and "
                    f"loss.alpha_mlm=0 and use the representation losses (alpha_cos, alpha_mse, alpha_att, alpha_val, "
                    f"alpha_pool), or use a teacher with an MLM head"
                )


# ----------------------------------------------------------------------------------------------------------------
# Output (logit) losses


def label_loss(student_logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """The student's loss on the gold labels of a task: cross-entropy of class logits [B, C] against int64 labels
    [B], or, for ``regression``, the MSE between the single output [B, 1] and float labels [B]. 0-dim fp32, mean
    over the batch."""
    if regression:
        return F.mse_loss(student_logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(student_logits.float(), labels)


def prob_cosine(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """1 - cosine between the class-probability distributions ``softmax(s / T)`` and ``softmax(t / T)`` ([B, C]),
    mean over the batch (0-dim fp32): the cosine term of the Distillator recipe (``CosineEmbeddingLoss`` with target 1
    between the teacher's and the student's softened outputs)."""
    ps = F.softmax(student_logits.float() / temperature, dim=-1)
    pt = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return (1 - F.cosine_similarity(ps, pt, dim=-1)).mean()


def kd_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft-target loss: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over the selected positions.

    Args:
        student_logits, teacher_logits: [..., V] (any float dtype; computed in fp32).
        temperature: T > 0. The T^2 factor keeps gradient magnitudes independent of T (Hinton et al., 2015).
        mask: bool [...] selecting positions (the masked tokens, or all non-pad ones); None = every position.

    Returns:
        0-dim fp32: sum over selected positions of the KL, divided by their number (0 when none), times T^2;
        as DistilBERT's ``KLDivLoss(reduction="batchmean")`` over the selected rows.
    """
    v = student_logits.shape[-1]
    s, t = student_logits, teacher_logits
    if mask is not None:
        s, t = s[mask], t[mask]
    s, t = s.reshape(-1, v).float(), t.reshape(-1, v).float()
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_ps, log_pt, reduction="sum", log_target=True)
    return kl / max(s.shape[0], 1) * temperature**2


def mlm_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-LM cross-entropy of the student (Devlin et al. 2019), mean over positions with ``labels != -100``.

    Args:
        student_logits: [..., V]; labels: Long [...] with the original token id at masked positions, -100 elsewhere.

    Returns:
        0-dim fp32 (0 when nothing is masked).
    """
    v = student_logits.shape[-1]
    labels = labels.reshape(-1)
    total = F.cross_entropy(student_logits.reshape(-1, v).float(), labels, ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------------------
# Representation losses


def _real(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask.bool()


def hidden_cosine(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """DistilBERT's cosine loss: ``1 - cos(h_s, h_t)`` per token, mean over non-pad tokens.

    Args:
        student_hidden, teacher_hidden: [B, L, H] (same H: project the student first when widths differ).
        attention_mask: [B, L], 1 = real token, 0 = pad (pads do not count).

    Returns:
        0-dim fp32; equals ``CosineEmbeddingLoss()(s[mask], t[mask], ones)``.
    """
    m = _real(attention_mask)
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1, eps=1e-8)
    return ((1.0 - cos) * m).sum() / m.sum().clamp_min(1)


def hidden_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """TinyBERT's hidden-state loss: mean squared error over non-pad tokens and hidden units.

    Args:
        student_hidden, teacher_hidden: [B, L, H] (student already projected to the teacher's H when widths differ).
        attention_mask: [B, L], 1 = real token.

    Returns:
        0-dim fp32: ``sum((s - t)^2 over real tokens) / (n_real * H)``.
    """
    m = _real(attention_mask).unsqueeze(-1)
    sq = (student_hidden.float() - teacher_hidden.float()).pow(2) * m
    return sq.sum() / (m.sum() * student_hidden.shape[-1]).clamp_min(1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, L, H] over the real tokens of each sequence -> [B, H] fp32 (sentence-transformers'
    mean pooling)."""
    m = _real(attention_mask).unsqueeze(-1).float()
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1)


def pooled_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Reimers & Gurevych (2020): MSE between the mean-pooled sentence embeddings of student and teacher.

    Args:
        student_hidden, teacher_hidden: [B, L, H] last hidden states (same H); attention_mask: [B, L].

    Returns:
        0-dim fp32: ``MSELoss()(mean_pool(s), mean_pool(t))``, mean over B x H.
    """
    return F.mse_loss(mean_pool(student_hidden, attention_mask), mean_pool(teacher_hidden, attention_mask))


def relation_log_probs(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Scaled dot-product relation ``log_softmax(a_r b_r^T / sqrt(d_r))`` per relation head r.

    Args:
        a, b: [B, L, D] (projections before the head split, e.g. the query and key Linear outputs);
            D must be divisible by ``num_heads``; d_r = D / num_heads.
        attention_mask: [B, L]; pad keys get probability 0.
        num_heads: relation heads R. With R = the model's attention heads and (a, b) = (query, key) this is the log of
            the model's attention probabilities.

    Returns:
        fp32 [B, R, L, L] log-probabilities over the last (key) axis.

    Raises ``ValueError`` when ``a`` or ``b`` is missing or empty (no attention inputs reached the loss: never a
    silent zero) or when ``num_heads`` does not divide D.
    """
    for x in (a, b):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.numel() == 0:
            got = "an empty tuple" if isinstance(x, tuple) and not x else repr(getattr(x, "shape", type(x).__name__))
            raise ValueError(
                f"an attention / relation loss received no attention inputs ({got}, expected [B, L, D] projections): "
                f"the model's attention did not provide them (under SDPA, output_attentions gives an empty tuple); "
                f"take Q/K/V from the projections (pretrain.distill) or load the model with eager attention"
            )
    bsz, length, dim = a.shape
    if dim % num_heads:
        raise ValueError(f"relation heads {num_heads} do not divide width {dim}; set loss.relation_heads")
    d = dim // num_heads
    a = a.float().view(bsz, length, num_heads, d).transpose(1, 2)
    b = b.float().view(bsz, length, num_heads, d).transpose(1, 2)
    scores = torch.matmul(a, b.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~_real(attention_mask)[:, None, None, :], _NEG)
    return F.log_softmax(scores, dim=-1)


def _relation_kl(log_pt: torch.Tensor, log_ps: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher row || student row) summed over keys, mean over heads and real query positions."""
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # [B, R, L]
    m = _real(attention_mask)[:, None, :].float()
    return (kl * m).sum() / (m.sum() * kl.shape[1]).clamp_min(1)


def attention_kl(
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    attention_mask: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """MiniLM's self-attention distribution transfer (Wang et al. 2020, eq. 5).

    ``KL(A_t || A_s)`` with ``A = softmax(Q K^T / sqrt(d_r))`` per relation head, summed over keys, mean over relation
    heads and real query positions. Pad keys are excluded from the softmax, pad queries from the mean.

    Args:
        student_q, student_k: [B, L, D_s]; teacher_q, teacher_k: [B, L, D_t] (Linear outputs before the head split;
            widths may differ, the relations are L x L).
        attention_mask: [B, L]. num_heads: relation heads R (dividing D_s and D_t).

    Returns:
        0-dim fp32.
    """
    return _relation_kl(
        relation_log_probs(teacher_q, teacher_k, attention_mask, num_heads),
        relation_log_probs(student_q, student_k, attention_mask, num_heads),
        attention_mask,
    )


def value_relation_kl(
    student_v: torch.Tensor, teacher_v: torch.Tensor, attention_mask: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """MiniLM's value-relation transfer (Wang et al. 2020, eq. 6-7): ``KL(VR_t || VR_s)``,
    ``VR = softmax(V V^T / sqrt(d_r))`` per relation head; reductions as :func:`attention_kl`.

    Args:
        student_v: [B, L, D_s]; teacher_v: [B, L, D_t]; attention_mask: [B, L]; num_heads: R.
    """
    return _relation_kl(
        relation_log_probs(teacher_v, teacher_v, attention_mask, num_heads),
        relation_log_probs(student_v, student_v, attention_mask, num_heads),
        attention_mask,
    )


# ----------------------------------------------------------------------------------------------------------------
# Combination


def combine_losses(cfg: LossConfig, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total ``sum(alpha_x * parts[x])`` over the active terms of ``cfg``.

    Args:
        cfg: the loss section. parts: 0-dim tensors keyed by term ("ce", "mlm", "cos", "mse", "att", "val",
            "pool"); every active term must be present.

    Returns:
        ``(total, logs)``: total 0-dim fp32 (with grad); logs maps "loss" and "loss_<term>" (each active term) to
        detached 0-dim tensors. Raises ``KeyError`` when an active term is missing, ``ValueError`` when no term is
        active (every weight 0).
    """
    total: torch.Tensor | None = None
    logs = {}
    for name, alpha in cfg.active().items():
        if name not in parts:
            raise KeyError(f"loss term {name!r} is active (alpha_{name}={alpha}) but was not computed")
        value = parts[name].float()
        total = alpha * value if total is None else total + alpha * value
        logs[f"loss_{name}"] = value.detach()
    if total is None:
        raise ValueError("no active loss term: every loss weight is 0")
    logs = {"loss": total.detach(), **logs}
    return total, logs
