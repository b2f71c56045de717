"""Task distillation: a fine-tuned classifier teaches a smaller classifier on labeled examples, on the same trainer.

The ``task`` config section names the task (the tasks of :mod:`pretrain.tasks`: ``glue:sst2``,
``embedded:rotten-tomatoes``, ``csv:PATH`` ...); the run then distils with :class:`pretrain.tasks.recipe.TaskRecipe`
instead of the shards' MLM recipe, with the same DeepSpeed engine, ZeRO stages, precision, accumulation, checkpoints
and exact resume, stop signals, SLURM submission, metrics and stages (:mod:`pretrain.stages`, TinyBERT's two steps).

- Teacher: a ``*ForSequenceClassification`` whose labels are the task's (fine-tune one with ``python -m
  pretrain.downstream --task T --model teacher=PATH --save-model DIR``).
- Student: (a) the teacher's layers (``student.layers``) with its classification head copied (the DistilBERT
  initialisation, :func:`pretrain.student.build_student` on the classifier); (b) ``task.student``: a task-agnostic
  distilled encoder (a run's ``student/``), with the teacher's head copied (``task.head: "teacher"``) or a new one
  (``"new"``): general distillation, then task distillation (TinyBERT, Jiao et al. 2020; DistilBERT(D), Sanh et al.
  2019 sec. 4.2); (c) ``student.init: "random"`` (any width: TinyBERT projections for the hidden losses).
- Losses (:class:`TaskDistillationModel`, this module; the terms of :mod:`pretrain.losses`): ``alpha_label`` x the label
  cross-entropy (MSE for regression), ``alpha_ce`` x KL(T) x T^2 between the class distributions (MSE between the
  outputs for regression), ``alpha_prob_cos`` x (1 - cosine of the softened class distributions), and the hidden and
  relation terms (``alpha_cos``, ``alpha_mse``, ``alpha_att``, ``alpha_val``, ``alpha_pool``) with the layer pairs of
  the pretraining recipe.
- Teacher logits: computed on the fly (in half precision on GPU, ``teacher.dtype``), or with
  ``task.teacher_logits: "precompute"`` once per training example into ``RUN/teacher_logits.pt``, keyed by a hash of
  the teacher's weights and the tokenized examples and reused while the key matches (the inputs do not change between
  epochs: no masking). Only for runs whose loss reads nothing but the logits.
- Evaluation: the task's metric (:func:`pretrain.tasks.compute_metrics`) on ``task.eval_split`` (dev: settings are
  chosen there) every ``train.eval_interval`` steps, with the teacher's score and the student's agreement with it.
- Export: ``student/`` loads with ``AutoModelForSequenceClassification`` and ``pipeline("text-classification")``,
  label names included.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from pretrain import losses as L
from pretrain.config import LOGIT_TERMS
from pretrain.distill import DistillationModel
from pretrain.losses import LossConfig


class TaskDistillationModel(DistillationModel):
    """Student classifier + frozen teacher classifier + the task losses (see the module docstring).

    Args: as :class:`pretrain.distill.DistillationModel` (layer pairs, TinyBERT projections and MiniLM relations are
    built the same way); ``regression``: the task is a regression (one output).
    """

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel,
        loss_cfg: LossConfig,
        layer_map: list[int],
        *,
        regression: bool,
    ) -> None:
        super().__init__(student, teacher, loss_cfg, layer_map)
        self.regression = regression

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One task-distillation forward.

        Args:
            input_ids, attention_mask: [B, L] int64; labels: [B] int64 class ids (float32 targets for regression);
            token_type_ids: [B, L] int64 segment ids (BERT pair tasks) or None; teacher_logits: [B, C] precomputed
            teacher logits (used when no hidden-state term needs the teacher's internals) or None.

        Returns:
            ``(loss, logs)`` as :meth:`DistillationModel.forward`: "loss", "loss_<term>", "n_tokens" (non-pad
            tokens) and "n_masked" (here the examples, B).
        """
        cfg = self.loss_cfg
        active = cfg.active()
        need_hidden = bool(set(active) - LOGIT_TERMS)
        kw = {"attention_mask": attention_mask, "output_hidden_states": need_hidden}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        with self._capture_qkv() as qkv:
            if teacher_logits is None or need_hidden:
                with torch.no_grad():
                    t_out = self.teacher(input_ids=input_ids, **kw)
                teacher_logits, t_hs = t_out.logits, t_out.hidden_states
            s_out = self.student(input_ids=input_ids, **kw)
        s_logits, s_hs = s_out.logits, s_out.hidden_states
        parts: dict[str, torch.Tensor] = {}
        if "label" in active:
            parts["label"] = L.label_loss(s_logits, labels, self.regression)
        if "ce" in active:
            parts["ce"] = (
                L.kd_kl(s_logits, teacher_logits, cfg.temperature)
                if not self.regression
                else torch.nn.functional.mse_loss(s_logits.float(), teacher_logits.float())
            )
        if "prob_cos" in active:
            parts["prob_cos"] = L.prob_cosine(s_logits, teacher_logits, cfg.temperature)
        if need_hidden:
            parts.update(self._representation_terms(active, s_hs[-1], t_hs[-1], s_hs, t_hs, attention_mask, qkv))
        loss, logs = L.combine_losses(cfg, parts)
        logs["n_masked"] = torch.tensor(float(input_ids.shape[0]), device=input_ids.device)
        logs["n_tokens"] = attention_mask.sum().detach()
        return loss, logs
