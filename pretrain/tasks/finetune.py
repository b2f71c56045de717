"""Fine-tuning on a labeled task (GLUE practice): the settings, the mean-pooled classifier head, the training loop with
selection on dev, and saving the selected model."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.cli import progress_bar
from data_prep.files import atomic_dir
from pretrain.card import write_card
from pretrain.losses import mean_pool
from pretrain.tasks.base import MEAN_HEAD_FILE, REGRESSION, Task
from pretrain.tasks.examples import Examples, collate, encode, length_grouped_batches, sorted_batches, uses_segment_ids
from pretrain.tasks.metrics import compute_metrics, score
from pretrain.tasks.models import ModelSpec, quiet_transformers
from pretrain.tasks.predict import predictions, run_batches


@dataclasses.dataclass
class FinetuneConfig:
    """Fine-tuning and evaluation settings of one task family.

    ``lr`` peak learning rate of AdamW (linear warmup over ``warmup_ratio`` of the steps, then linear decay to 0);
    ``batch_size`` training examples per step; ``max_length`` tokens per example (truncated); ``max_train`` /
    ``max_eval`` stratified caps on the train split and on each evaluation split (None = all); ``head``: ``cls``
    (``AutoModelForSequenceClassification``: the model's own head on the [CLS] token, through BERT's pooler) or
    ``mean`` (:class:`MeanPoolClassifier`: a linear head on the mean-pooled last hidden states, the pooling
    sentence-transformers models are trained with).
    """

    epochs: int = 3
    lr: float = 2e-5
    batch_size: int = 32
    max_length: int = 128
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_train: int | None = None
    max_eval: int | None = None
    eval_batch_size: int = 128
    head: str = "cls"


# GLUE: the recipe of transformers' examples/pytorch/text-classification (run_glue.py README: batch 32, lr 2e-5,
# 3 epochs, 128 tokens, no warmup or weight decay), the usual way DistilBERT-style models are fine-tuned on GLUE.
GLUE_DEFAULTS = FinetuneConfig()
# Embedded and local tasks: CPU-sized (the demo's 6-layer teacher and three 3-layer models x 2 seeds in about
# 8 minutes on 2 quiet cores; docs/downstream.md): 1,200 train examples, 2 epochs, lr 1e-4 (small data, few steps:
# a higher rate than GLUE's 2e-5), 6% warmup, weight decay 0.01; dev and test capped at 1,000 examples.
CPU_DEFAULTS = FinetuneConfig(
    epochs=2,
    lr=1e-4,
    batch_size=32,
    max_length=128,
    weight_decay=0.01,
    warmup_ratio=0.06,
    max_train=1200,
    max_eval=1000,
)


def defaults_for(family: str) -> FinetuneConfig:
    """The default settings of a task family: ``glue`` -> :data:`GLUE_DEFAULTS`, else :data:`CPU_DEFAULTS`."""
    return copy.deepcopy(GLUE_DEFAULTS if family == "glue" else CPU_DEFAULTS)


class MeanPoolClassifier(torch.nn.Module):
    """A sequence classifier on mean-pooled last hidden states: ``encoder`` (a bare ``AutoModel``) ->
    :func:`pretrain.losses.mean_pool` [b, hidden] -> dropout (the encoder's hidden dropout) -> ``Linear(hidden,
    num_labels)`` (normal init, std ``initializer_range``). Loss: cross-entropy, or MSE on ``logits[:, 0]`` for
    regression. For sentence encoders trained with mean pooling (all-MiniLM-L6-v2, the demo's teacher), whose [CLS]
    state is not a sentence summary: in its first layers it barely varies between inputs, so BERT's [CLS] pooler
    head cannot learn from a model truncated there (docs/downstream.md)."""

    def __init__(self, encoder: Any, num_labels: int, regression: bool) -> None:
        super().__init__()
        self.encoder, self.config, self.regression = encoder, encoder.config, regression
        cfg = encoder.config
        self.dropout = torch.nn.Dropout(getattr(cfg, "hidden_dropout_prob", getattr(cfg, "dropout", 0.1)))
        self.classifier = torch.nn.Linear(cfg.hidden_size, num_labels)
        torch.nn.init.normal_(self.classifier.weight, std=getattr(cfg, "initializer_range", 0.02))
        torch.nn.init.zeros_(self.classifier.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        """logits [b, num_labels] fp32 (and ``loss`` when ``labels`` [b] are given), as a namespace."""
        import types as _types

        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        logits = self.classifier(self.dropout(mean_pool(hidden, attention_mask)))
        loss = None
        if labels is not None:
            loss = (
                torch.nn.functional.mse_loss(logits[:, 0], labels.float())
                if self.regression
                else torch.nn.functional.cross_entropy(logits, labels)
            )
        return _types.SimpleNamespace(loss=loss, logits=logits)


@torch.inference_mode()
def predict(
    model: Any, data: Examples, *, pad_id: int, batch_size: int, device: torch.device, regression: bool
) -> tuple[np.ndarray, float]:
    """Predictions [n] (class ids int64, or float32 scores) of a sequence-classification ``model`` in eval mode, and
    the forward throughput in examples/s (length-sorted batches, ``torch.inference_mode``; the one prediction loop
    :func:`pretrain.tasks.predict.run_batches`)."""
    model.eval()
    segment_ids = uses_segment_ids(model)
    t0 = time.perf_counter()
    batches = sorted_batches(data.lengths, batch_size)
    logits = run_batches(model, data, batches, pad_id=pad_id, device=device, segment_ids=segment_ids)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return predictions(logits, regression), len(data.ids) / max(time.perf_counter() - t0, 1e-9)


def _classifier(spec: ModelSpec, task: Task, head: str, seed: int, device: torch.device) -> Any:
    """The classifier to fine-tune, fp32 on ``device``: ``AutoModelForSequenceClassification`` (``head`` "cls") or
    :class:`MeanPoolClassifier` ("mean"); ``torch.manual_seed(seed)`` first (the new head's initialisation)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    regression = task.kind == REGRESSION
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {
        "num_labels": task.num_labels,
        "problem_type": "regression" if regression else "single_label_classification",
    }
    if not regression:
        kwargs["id2label"] = dict(enumerate(task.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
    with quiet_transformers():
        if head == "mean":
            model = MeanPoolClassifier(AutoModel.from_pretrained(spec.path), task.num_labels, regression)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(spec.path, **kwargs)
    return model.to(device=device, dtype=torch.float32)


def _optimizer(model: torch.nn.Module, cfg: FinetuneConfig, total: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay on biases and LayerNorm weights) and linear warmup over ``cfg.warmup_ratio`` of the
    ``total`` steps, then linear decay to 0."""
    warmup = int(cfg.warmup_ratio * total)

    def decays(n: str, p: torch.Tensor) -> bool:
        return p.ndim > 1 and "LayerNorm" not in n and "layer_norm" not in n

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    return opt, sched


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclasses.dataclass
class _Fit:
    """What one fine-tuning run recorded: per-step losses, the best (dev score, epoch, state), time and examples."""

    losses: list[float] = dataclasses.field(default_factory=list)
    best: tuple[float, int, dict[str, torch.Tensor] | None] = (-math.inf, 0, None)
    train_time: float = 0.0
    seen: int = 0


def _fit(
    model: Any,
    task: Task,
    cfg: FinetuneConfig,
    encoded: dict[str, Examples],
    seed: int,
    *,
    select: str | None,
    pad_id: int,
    device: torch.device,
    desc: str = "fine-tune",
) -> _Fit:
    """Train ``cfg.epochs`` epochs of length-grouped batches (order from ``numpy.random.default_rng(seed)``); after
    each epoch score the ``select`` split and keep the best state (not after the last epoch: the model is it). A
    progress bar per epoch (stderr, ``desc``: batches done of the epoch's total, ETA, the last dev score)."""
    regression = task.kind == REGRESSION
    train = encoded["train"]
    segment_ids = uses_segment_ids(model)
    rng = np.random.default_rng(seed)
    opt, sched = _optimizer(model, cfg, math.ceil(len(train.ids) / cfg.batch_size) * cfg.epochs)
    fit = _Fit()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        batches = length_grouped_batches(train.lengths, cfg.batch_size, rng)
        bar = progress_bar(len(batches), f"{desc} seed {seed} epoch {epoch}/{cfg.epochs}", "batches")
        for idx in batches:
            batch = collate(train, idx, pad_id, segment_ids=segment_ids, regression=regression)
            out = model(**{k: v.to(device) for k, v in batch.items()})
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            fit.losses.append(float(out.loss.detach()))
            fit.seen += len(idx)
            bar.update(1)
        fit.train_time += time.perf_counter() - t0
        if select is not None:
            preds, _ = predict(
                model,
                encoded[select],
                pad_id=pad_id,
                batch_size=cfg.eval_batch_size,
                device=device,
                regression=regression,
            )
            dev = score({select: compute_metrics(task.metrics, preds, encoded[select].labels)})
            bar.set_postfix_str(f"{select} score {dev:.4f}")
            if dev > fit.best[0]:
                fit.best = (dev, epoch, _state_copy(model) if epoch < cfg.epochs else None)
        bar.close()
    return fit


def finetune(
    spec: ModelSpec,
    task: Task,
    cfg: FinetuneConfig,
    seed: int,
    *,
    device: torch.device,
    encoded: dict[str, Examples] | None = None,
    save_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Fine-tune ``spec`` on ``task`` once (seed ``seed``) and evaluate it.

    ``AutoModelForSequenceClassification`` with ``num_labels`` = the task's classes (1 and MSE for regression), fp32,
    AdamW (weight decay off for biases and LayerNorm weights), linear warmup then linear decay, gradient clipping at
    ``cfg.max_grad_norm``, length-grouped batches. After each epoch the select split (dev) is evaluated and the best
    state kept; the reported splits are evaluated with that state (when the select split is itself reported, as for
    GLUE, the last epoch is used: no selection on the reported set). ``torch.manual_seed(seed)`` fixes the head's
    initialisation and dropout; the batch order comes from ``numpy.random.default_rng(seed)``.

    Returns a JSON-serialisable dict: ``seed``, ``metrics`` ({split: {metric: value}}), ``score`` (their mean),
    ``dev_score``, ``epoch`` (selected, 1-based), ``loss_first`` / ``loss_last`` (mean training loss of the first /
    last 10% of the steps), ``train_examples_per_s``, ``inference_examples_per_s`` (forward on the reported
    split(s)), ``train_seconds``, ``steps``. ``save_dir``: the selected model and its tokenizer are saved there.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.path)
    if encoded is None:
        encoded = {n: encode(tok, sp, cfg.max_length) for n, sp in task.splits.items()}
    regression = task.kind == REGRESSION
    model = _classifier(spec, task, cfg.head, seed, device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    select = task.select_split if task.select_split not in task.report_splits else None
    fit = _fit(model, task, cfg, encoded, seed, select=select, pad_id=pad_id, device=device, desc=spec.name)
    if select is not None and fit.best[2] is not None:
        model.load_state_dict(fit.best[2])
    metrics, speeds = {}, []
    for split in task.report_splits:
        preds, speed = predict(
            model, encoded[split], pad_id=pad_id, batch_size=cfg.eval_batch_size, device=device, regression=regression
        )
        metrics[split] = compute_metrics(task.metrics, preds, encoded[split].labels)
        speeds.append(speed)
    if save_dir is not None:
        info = {"task": task.name, "seed": seed, "model": spec.name, "source": spec.path, "metrics": metrics}
        save_model(model, tok, Path(save_dir), {**info, "head": cfg.head, "label_names": task.label_names})
    k = max(1, len(fit.losses) // 10)
    return {
        "seed": seed,
        "metrics": metrics,
        "score": score(metrics),
        "dev_score": None if select is None else fit.best[0],
        "epoch": fit.best[1] if select is not None else cfg.epochs,
        "loss_first": float(np.mean(fit.losses[:k])),
        "loss_last": float(np.mean(fit.losses[-k:])),
        "steps": len(fit.losses),
        "train_examples_per_s": fit.seen / max(fit.train_time, 1e-9),
        "train_seconds": fit.train_time,
        "inference_examples_per_s": float(np.mean(speeds)),
    }


def save_model(model: Any, tokenizer: Any, out: Path, info: dict[str, Any]) -> None:
    """Save a fine-tuned model folder atomically (temporary sibling folder, then rename over ``out``). A
    :class:`MeanPoolClassifier` is saved as its encoder's folder plus ``downstream_head.safetensors``
    (``classifier.weight`` [num_labels, hidden], ``classifier.bias``). A model card ``README.md`` goes with it."""
    with atomic_dir(out, what="fine-tuned model (--save-model)") as tmp:
        with quiet_transformers():
            if isinstance(model, MeanPoolClassifier):
                from safetensors.torch import save_file

                model.encoder.save_pretrained(tmp, safe_serialization=True)
                save_file(
                    {f"classifier.{k}": v.contiguous() for k, v in model.classifier.state_dict().items()},
                    str(tmp / MEAN_HEAD_FILE),
                )
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        (tmp / "downstream_finetune.json").write_text(json.dumps(info, indent=1, default=str))
        write_card(tmp, final=out)  # README.md: base model, task, seed, metrics (pretrain.card)
