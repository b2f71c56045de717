"""Held-out metrics, one implementation for the in-run evaluation (:class:`Validator`) and ``python -m
pretrain.evaluate``.

MLM metrics (the DistilBERT recipe's objectives measured on held-out data, Sanh et al. 2019): on the masked positions,
the model's cross-entropy (nats), perplexity (its exp), accuracy (argmax = original token), KL(teacher || model) at
temperature 1 and top-1 agreement with the teacher. :func:`mlm_sums` adds one batch's sums, :func:`mlm_summary` turns
sums into the means; perplexity is capped at exp(:data:`MAX_LOG_PERPLEXITY`) so that a diverged model gives a large
finite number, not ``inf``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from pretrain.losses import mean_pool

MLM_SUMS = ("masked_tokens", "nll", "correct", "kl", "agree")
MAX_LOG_PERPLEXITY = 50.0
IGNORE = -100  # label of positions that are not evaluated (the transformers / PyTorch cross-entropy convention)


def mlm_sums(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
    """Sums over ``n`` masked positions: float64 [5] = (n, NLL, correct, KL(teacher || model), agreement).

    Args:
        logits: [n, vocab] the model's MLM logits; targets: [n] int64 original tokens; teacher_logits: [n, vocab] the
            teacher's logits on the same positions (None: KL and agreement are 0, as for the teacher itself).
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    top = logp.argmax(-1)
    out = torch.zeros(5, dtype=torch.float64, device=logits.device)
    out[0] = targets.numel()
    out[1] = F.nll_loss(logp, targets, reduction="sum")
    out[2] = (top == targets).sum()
    if teacher_logits is not None:
        logp_t = F.log_softmax(teacher_logits.float(), dim=-1)
        out[3] = (logp_t.exp() * (logp_t - logp)).sum()
        out[4] = (top == logp_t.argmax(-1)).sum()
    else:
        out[4] = targets.numel()
    return out


def mlm_summary(sums: torch.Tensor | list[float]) -> dict[str, float] | None:
    """Means from :func:`mlm_sums` totals: ``mlm_loss`` (nats), ``perplexity``, ``mlm_accuracy``, ``kl_to_teacher``,
    ``agreement``, ``masked_tokens``; None when no position was masked."""
    n, nll, correct, kl, agree = (float(v) for v in sums)
    if n == 0:
        return None
    return {
        "mlm_loss": nll / n,
        "perplexity": math.exp(min(nll / n, MAX_LOG_PERPLEXITY)),
        "mlm_accuracy": correct / n,
        "kl_to_teacher": kl / n,
        "agreement": agree / n,
        "masked_tokens": int(n),
    }


def representation_sums(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """float64 [4] = (real tokens, sum of per-token hidden cosine, sequences, sum of mean-pooled cosine) of student
    and teacher last hidden states [B, L, H] (same H) under ``attention_mask`` [B, L]."""
    real = attention_mask.bool()
    out = torch.zeros(4, dtype=torch.float64, device=student_hidden.device)
    out[0] = real.sum()
    out[1] = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)[real].sum()
    out[2] = student_hidden.shape[0]
    out[3] = F.cosine_similarity(
        mean_pool(student_hidden, attention_mask), mean_pool(teacher_hidden, attention_mask), dim=-1
    ).sum()
    return out


def evaluation_due(step: int, eval_interval: int, max_steps: int) -> bool:
    """Whether the run evaluates after optimizer step ``step``: every ``eval_interval`` steps (``train.eval_interval``;
    0: never in between) and at the last step (``max_steps``)."""
    return bool((eval_interval and step % eval_interval == 0) or step == max_steps)


class Validator:
    """The in-run evaluation of the student against the teacher on the valid split (collective: every rank runs it).

    Over the first ``train.eval_sequences`` valid sequences (shared out over the ranks), masked as in training with
    fixed masks (step 0, micro-step = batch index): the MLM metrics (:func:`mlm_sums`) where both have an MLM head, and
    the cosine between last hidden states (mean over real tokens) and between mean-pooled sentence embeddings (mean
    over sequences) when the widths agree.

    Args:
        model: the :class:`pretrain.distill.DistillationModel`; valid: the split (``ShardedTokens``); masker: the run's
        :class:`pretrain.masking.Masker`; batches: ``(rank, world) -> iterable of collated batches``;
        device; all_reduce: ``torch.distributed.all_reduce`` (sum).
    """

    def __init__(self, model, batches, masker, *, device: torch.device, all_reduce, rank: int):
        from pretrain.student import mlm_head

        self.model, self.batches, self.masker = model, batches, masker
        self.device, self.all_reduce, self.rank = device, all_reduce, rank
        self.heads = (mlm_head(model.student), mlm_head(model.teacher))
        self.same_width = model.student.config.hidden_size == model.teacher.config.hidden_size

    @torch.no_grad()
    def run(self, step: int) -> dict[str, Any]:
        """Evaluate; returns the ``"split": "valid"`` record of ``step`` (on every rank)."""
        return self._run(step)

    def _run(self, step: int) -> dict[str, Any]:  # undecorated: mutmut does not mutate decorated functions
        from pretrain.student import base_model

        student, teacher = self.model.student, self.model.teacher
        head_s, head_t = self.heads
        mlm = torch.zeros(5, dtype=torch.float64, device=self.device)
        rep = torch.zeros(4, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(self.batches()):
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            masked, labels = self.masker(ids, mask, step=0, rank=self.rank, micro_step=i)
            hs = base_model(student)(input_ids=masked, attention_mask=mask).last_hidden_state
            ht = base_model(teacher)(input_ids=masked, attention_mask=mask).last_hidden_state
            if self.same_width:
                rep += representation_sums(hs, ht, mask)
            else:
                rep[0] += mask.sum()
                rep[2] += ids.shape[0]
            if head_s is not None and head_t is not None:
                pos = labels != IGNORE
                mlm += mlm_sums(head_s(hs[pos]), labels[pos], head_t(ht[pos]))
        both = torch.cat([mlm, rep])
        self.all_reduce(both)
        mlm_total, (tokens, cos_sum, sequences, pooled_sum) = both[:5].tolist(), both[5:].tolist()
        rec: dict[str, Any] = {"split": "valid", "step": step, "sequences": int(sequences), "tokens": int(tokens)}
        rec.update(mlm_summary(mlm_total) or {})
        if self.same_width and tokens > 0:
            rec.update(hidden_cosine=cos_sum / tokens, pooled_cosine=pooled_sum / sequences)
        return rec
