"""Downstream evaluation: fine-tune (or probe) teacher, baselines and distilled student on labeled tasks.

``python -m pretrain.downstream --run RUN`` evaluates, with one protocol for every model, the run's teacher
(``RUN/config.json`` ``teacher.name_or_path``), ``student_init`` (the student before distillation), the **top-layer
truncation** baseline (the teacher's first k layers, k = the student's depth, built with
:func:`pretrain.student.build_student`; Sajjad et al. 2020, "Poor Man's BERT") and the distilled ``student``, on
``embedded:rotten-tomatoes`` by default (see :mod:`pretrain.tasks` for every task), and writes ``downstream.json``,
``downstream.md`` (the table) and ``downstream.png`` (a bar chart) into ``--output``, each atomically.

Modes:

- ``finetune`` (default, GLUE practice): ``AutoModelForSequenceClassification`` (one output and MSE for regression),
  AdamW with linear decay, length-grouped batches with dynamic padding, ``--seeds N`` runs reported as mean and sample
  standard deviation. The epoch is chosen on the dev split and the test split reported (GLUE: the dev set is
  reported after the last epoch, as in ``run_glue.py``). A small loop, not ``transformers.Trainer``: the Trainer
  needs ``accelerate`` (not otherwise a dependency), and the loop is short, keeps the best dev state in memory and
  does exactly the length grouping, selection and timing described here.
- ``probe``: frozen mean-pooled last hidden states (:func:`pretrain.losses.mean_pool`), computed once per model and
  split under ``torch.inference_mode`` in length-sorted batches, then scikit-learn ``LogisticRegression``
  (classification, the MTEB classification protocol, Muennighoff et al. 2023) or ``Ridge`` (regression), with the
  regularisation strength chosen on dev. Deterministic: every seed gives the same number (std 0).

Library calls: :func:`run_downstream` (returns the result dict) and :func:`render_downstream_markdown` (the tables,
for the run report).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.embedded import resolve_model
from data_prep.errors import DataPrepError, DistillError
from data_prep.files import atomic_dir, atomic_path, atomic_write_text
from pretrain.losses import mean_pool
from pretrain.tasks import (
    DEFAULT_TASK,
    OFFLINE_TASKS,
    REGRESSION,
    LocalFields,
    SplitConfig,
    Task,
    TaskError,
    compute_metrics,
    known_tasks,
    load_task,
    score,
)

log = logging.getLogger("pretrain.downstream")
RESULT_VERSION = 1
RUN_ROLES = ("teacher", "student_init", "truncation", "student")


class DownstreamError(DistillError, ValueError):
    """A user-facing error of the downstream evaluation (bad task, model, flag): the message says what to do."""

    exit_code = 2


# --------------------------------------------------------------------------------------------------------- settings
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
PROBE_C = (0.1, 1.0, 10.0, 100.0)  # LogisticRegression inverse regularisation grid, chosen on dev
PROBE_ALPHA = (0.1, 1.0, 10.0, 100.0)  # Ridge regularisation grid, chosen on dev


def defaults_for(family: str) -> FinetuneConfig:
    """The default settings of a task family: ``glue`` -> :data:`GLUE_DEFAULTS`, else :data:`CPU_DEFAULTS`."""
    return copy.deepcopy(GLUE_DEFAULTS if family == "glue" else CPU_DEFAULTS)


# ----------------------------------------------------------------------------------------------------------- models
@dataclasses.dataclass
class ModelSpec:
    """A model under evaluation: display ``name``, loadable ``path`` (local folder or hub name), encoder ``params``
    (embeddings + layers, pooler and heads excluded) and ``layers``, filled by :func:`check_model`."""

    name: str
    path: str
    params: int = 0
    layers: int = 0
    hidden: int = 0


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load reports (newly initialised heads are expected here)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_model(spec: ModelSpec) -> ModelSpec:
    """Resolve ``embedded:NAME``, load the config, tokenizer and weights of ``spec.path`` once; fill params / layers.

    Raises:
        DownstreamError: the path is not a loadable Hugging Face model (names the model and what failed).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        spec.path = resolve_model(spec.path)
    except DataPrepError as e:
        raise DownstreamError(f"model {spec.name}={spec.path}: {e}") from None
    p = Path(spec.path).expanduser()
    if p.exists() and not (p / "config.json").is_file():
        raise DownstreamError(
            f"model {spec.name}={spec.path}: no config.json; give a Hugging Face model directory "
            "(RUN/student, RUN/student_init) or a hub name"
        )
    try:
        with _quiet_transformers():
            AutoConfig.from_pretrained(spec.path)
            AutoTokenizer.from_pretrained(spec.path)
            model = AutoModel.from_pretrained(spec.path)
    except Exception as e:
        raise DownstreamError(
            f"model {spec.name}={spec.path} does not load ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}); give a Hugging Face model "
            "directory with config.json, weights and tokenizer files, or a reachable hub name"
        ) from None
    spec.params = sum(t.numel() for n, t in model.named_parameters() if not n.startswith("pooler."))
    spec.layers = int(model.config.num_hidden_layers)
    spec.hidden = int(model.config.hidden_size)
    return spec


def build_truncation_baseline(teacher_path: str, k: int, out: str | os.PathLike) -> Path:
    """Save the teacher's first ``k`` layers (embeddings, layers 0..k-1, pooler if any) as a model folder ``out``.

    Built with the project's student builder (:func:`pretrain.student.build_student` with
    ``StudentConfig(layers=list(range(k)))``, architecture "same", init "teacher"): the "top-layer dropping" baseline
    of Sajjad et al. (2020), which comes within a few GLUE points of DistilBERT without distillation. The teacher is
    loaded with ``AutoModel`` (no MLM head: fine-tuning adds its own head). Written to a temporary sibling folder and
    renamed into place. Returns ``out``.

    Raises:
        DownstreamError: the teacher does not load or has fewer than ``k`` layers.
    """
    from transformers import AutoModel, AutoTokenizer

    from pretrain.student import StudentConfig, build_student

    out = Path(out)
    try:
        with _quiet_transformers():
            teacher = AutoModel.from_pretrained(teacher_path)
            tok = AutoTokenizer.from_pretrained(teacher_path)
    except Exception as e:
        raise DownstreamError(f"truncation baseline: the teacher {teacher_path} does not load ({e})") from None
    n = teacher.config.num_hidden_layers
    if not 0 < k <= n:
        raise DownstreamError(f"truncation baseline: k={k} layers, but the teacher {teacher_path} has {n}")
    student, _ = build_student(teacher, StudentConfig(layers=list(range(k))))
    with atomic_dir(out) as tmp:
        with _quiet_transformers():
            student.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        (tmp / "truncation.json").write_text(
            json.dumps(
                {
                    "teacher": str(teacher_path),
                    "layers": list(range(k)),
                    "built_with": "pretrain.student.build_student",
                },
                indent=1,
            )
        )
    return out


def run_models(run_dir: str | os.PathLike, output: str | os.PathLike) -> list[ModelSpec]:
    """The default models of a run directory, in table order: ``teacher``, ``student_init``, ``truncation``,
    ``student`` (the ones present; the truncation baseline is built under ``output/models/truncation`` with
    k = the student's depth, reused when it is there for the same teacher and k).

    Raises:
        DownstreamError: ``run_dir`` has no ``config.json`` or neither ``student/`` nor ``student_init/``.
    """
    from transformers import AutoConfig

    run = Path(run_dir)
    try:
        cfg = json.loads((run / "config.json").read_text())
        teacher = cfg["teacher"]["name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DownstreamError(
            f"--run {run}: cannot read teacher.name_or_path from {run / 'config.json'} ({e}); "
            "give the output_dir of a distillation run"
        ) from None
    try:
        teacher_path = resolve_model(teacher)
    except DataPrepError as e:
        raise DownstreamError(f"--run {run}: teacher {teacher}: {e}") from None
    students = [d for d in ("student", "student_init") if (run / d / "config.json").is_file()]
    if not students:
        raise DownstreamError(f"--run {run}: no student/ or student_init/ model folder (the trainer exports them)")
    k = int(AutoConfig.from_pretrained(run / students[0]).num_hidden_layers)
    trunc = Path(output) / "models" / "truncation"
    marker = trunc / "truncation.json"
    want = {"teacher": str(teacher_path), "layers": list(range(k))}
    try:
        have = json.loads(marker.read_text())
        fresh = {k2: have.get(k2) for k2 in want} != want
    except (OSError, ValueError):
        fresh = True
    if fresh:
        log.info("building the truncation baseline: the first %d layers of %s -> %s", k, teacher, trunc)
        build_truncation_baseline(teacher_path, k, trunc)
    specs = [ModelSpec("teacher", teacher_path)]
    if "student_init" in students:
        specs.append(ModelSpec("student_init", str(run / "student_init")))
    specs.append(ModelSpec("truncation", str(trunc)))
    if "student" in students:
        specs.append(ModelSpec("student", str(run / "student")))
    return specs


# ------------------------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class Encoded:
    """Token ids of one split for one tokenizer: ``ids[i]`` int64 [len_i] (and ``types[i]`` token-type ids or None),
    ``labels`` [n] (int64 or float32)."""

    ids: list[np.ndarray]
    types: list[np.ndarray] | None
    labels: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)


def encode(tokenizer, split, max_length: int) -> Encoded:
    """Tokenise a :class:`pretrain.tasks.Split` (text, or text pair) with truncation to ``max_length`` tokens."""
    enc = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length, return_token_type_ids=True)
    types = enc.get("token_type_ids")
    return Encoded(
        [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]],
        None if types is None else [np.asarray(x, dtype=np.int64) for x in types],
        split.labels,
    )


def uses_token_types(model) -> bool:
    """True when ``model`` takes segment ids (BERT-style ``token_type_ids`` with ``type_vocab_size`` > 1)."""
    import inspect

    return (getattr(model.config, "type_vocab_size", 0) or 0) > 1 and (
        "token_type_ids" in inspect.signature(model.forward).parameters
    )


def collate(data: Encoded, index: Sequence[int], pad_id: int, types: bool = True) -> dict[str, torch.Tensor]:
    """Right-pad the examples ``index`` to their longest: ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``
    when ``types`` and the tokenizer gave them) [b, L] int64 (dynamic padding)."""
    width = max(len(data.ids[i]) for i in index)
    ids = np.full((len(index), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    types = None if data.types is None or not types else np.zeros((len(index), width), dtype=np.int64)
    for r, i in enumerate(index):
        n = len(data.ids[i])
        ids[r, :n] = data.ids[i]
        mask[r, :n] = 1
        if types is not None:
            types[r, :n] = data.types[i]
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if types is not None:
        out["token_type_ids"] = torch.from_numpy(types)
    return out


def length_grouped_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, mega: int = 50
) -> list[np.ndarray]:
    """Training batches grouped by length (the ``group_by_length`` sampler of transformers): a random permutation is
    cut into mega-batches of ``mega * batch_size``, each sorted by length, cut into batches, and the batch order is
    shuffled. Every example appears exactly once; padding waste is small while the order stays random."""
    perm = rng.permutation(len(lengths))
    batches = []
    for s in range(0, len(perm), mega * batch_size):
        chunk = perm[s : s + mega * batch_size]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches over examples sorted by length (longest first): least padding."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------------------------------------- finetune
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.inference_mode()
def predict(
    model, data: Encoded, *, pad_id: int, batch_size: int, device: torch.device, regression: bool
) -> tuple[np.ndarray, float]:
    """Predictions [n] (class ids int64, or float scores) of a sequence-classification ``model`` in eval mode, and
    the forward throughput in examples/s (length-sorted batches, ``torch.inference_mode``)."""
    model.eval()
    preds = np.zeros(len(data.ids), dtype=np.float32 if regression else np.int64)
    tt = uses_token_types(model)
    t0 = time.perf_counter()
    for idx in sorted_batches(data.lengths, batch_size):
        batch = {k: v.to(device) for k, v in collate(data, idx, pad_id, tt).items()}
        logits = model(**batch).logits.float()
        preds[idx] = (logits[:, 0] if regression else logits.argmax(-1)).cpu().numpy()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return preds, len(data.ids) / max(time.perf_counter() - t0, 1e-9)


class MeanPoolClassifier(torch.nn.Module):
    """A sequence classifier on mean-pooled last hidden states: ``encoder`` (a bare ``AutoModel``) ->
    :func:`pretrain.losses.mean_pool` [b, hidden] -> dropout (the encoder's hidden dropout) -> ``Linear(hidden,
    num_labels)`` (normal init, std ``initializer_range``). Loss: cross-entropy, or MSE on ``logits[:, 0]`` for
    regression. For sentence encoders trained with mean pooling (all-MiniLM-L6-v2, the demo's teacher), whose [CLS]
    state is not a sentence summary: in its first layers it barely varies between inputs, so BERT's [CLS] pooler
    head cannot learn from a model truncated there (docs/downstream.md)."""

    def __init__(self, encoder: torch.nn.Module, num_labels: int, regression: bool):
        super().__init__()
        self.encoder, self.config, self.regression = encoder, encoder.config, regression
        cfg = encoder.config
        self.dropout = torch.nn.Dropout(getattr(cfg, "hidden_dropout_prob", getattr(cfg, "dropout", 0.1)))
        self.classifier = torch.nn.Linear(cfg.hidden_size, num_labels)
        torch.nn.init.normal_(self.classifier.weight, std=getattr(cfg, "initializer_range", 0.02))
        torch.nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
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


def _state_copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetune(
    spec: ModelSpec,
    task: Task,
    cfg: FinetuneConfig,
    seed: int,
    *,
    device: torch.device,
    encoded: dict[str, Encoded] | None = None,
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
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.path)
    if encoded is None:
        encoded = {n: encode(tok, sp, cfg.max_length) for n, sp in task.splits.items()}
    regression = task.kind == REGRESSION
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {
        "num_labels": task.num_labels,
        "problem_type": "regression" if regression else "single_label_classification",
    }
    if not regression:
        kwargs["id2label"] = dict(enumerate(task.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
    with _quiet_transformers():
        if cfg.head == "mean":
            from transformers import AutoModel

            model = MeanPoolClassifier(AutoModel.from_pretrained(spec.path), task.num_labels, regression)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(spec.path, **kwargs)
    model = model.to(device=device, dtype=torch.float32)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    train = encoded["train"]
    types = uses_token_types(model)
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(train.ids) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "LayerNorm" not in n and "layer_norm" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim > 1 and "LayerNorm" not in n and "layer_norm" not in n)
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    select = task.select_split if task.select_split not in task.report_splits else None
    losses: list[float] = []
    best = (-math.inf, 0, None)
    train_time, seen = 0.0, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for idx in length_grouped_batches(train.lengths, cfg.batch_size, rng):
            batch = {k: v.to(device) for k, v in collate(train, idx, pad_id, types).items()}
            y = torch.from_numpy(train.labels[idx]).to(device)
            out = model(**batch, labels=y.float() if regression else y)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            seen += len(idx)
        train_time += time.perf_counter() - t0
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
            if dev > best[0]:
                best = (dev, epoch, _state_copy(model) if epoch < cfg.epochs else None)
    if select is not None and best[2] is not None:
        model.load_state_dict(best[2])
    metrics, speeds = {}, []
    for split in task.report_splits:
        preds, speed = predict(
            model, encoded[split], pad_id=pad_id, batch_size=cfg.eval_batch_size, device=device, regression=regression
        )
        metrics[split] = compute_metrics(task.metrics, preds, encoded[split].labels)
        speeds.append(speed)
    if save_dir is not None:
        _save_model(
            model,
            tok,
            Path(save_dir),
            {
                "task": task.name,
                "seed": seed,
                "model": spec.name,
                "source": spec.path,
                "metrics": metrics,
                "head": cfg.head,
                "label_names": task.label_names,
            },
        )
    k = max(1, len(losses) // 10)
    return {
        "seed": seed,
        "metrics": metrics,
        "score": score(metrics),
        "dev_score": None if select is None else best[0],
        "epoch": best[1] if select is not None else cfg.epochs,
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "steps": len(losses),
        "train_examples_per_s": seen / max(train_time, 1e-9),
        "train_seconds": train_time,
        "inference_examples_per_s": float(np.mean(speeds)),
    }


def _save_model(model, tokenizer, out: Path, info: dict) -> None:
    """Save a fine-tuned model folder atomically (temporary sibling folder, then rename over ``out``). A
    :class:`MeanPoolClassifier` is saved as its encoder's folder plus ``downstream_head.safetensors``
    (``classifier.weight`` [num_labels, hidden], ``classifier.bias``)."""
    with atomic_dir(out) as tmp:
        with _quiet_transformers():
            if isinstance(model, MeanPoolClassifier):
                from safetensors.torch import save_file

                model.encoder.save_pretrained(tmp, safe_serialization=True)
                save_file(
                    {f"classifier.{k}": v.contiguous() for k, v in model.classifier.state_dict().items()},
                    str(tmp / "downstream_head.safetensors"),
                )
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        (tmp / "downstream_finetune.json").write_text(json.dumps(info, indent=1, default=str))


# ------------------------------------------------------------------------------------------------------------ probe
@torch.inference_mode()
def embed(model, data: Encoded, *, pad_id: int, batch_size: int, device: torch.device) -> tuple[np.ndarray, float]:
    """Mean-pooled last hidden states [n, hidden] float32 of a bare encoder (``AutoModel``) over ``data``
    (:func:`pretrain.losses.mean_pool`: special tokens included, padding excluded), in length-sorted batches under
    ``torch.inference_mode``; and the throughput in examples/s."""
    model.eval()
    out = np.zeros((len(data.ids), model.config.hidden_size), dtype=np.float32)
    tt = uses_token_types(model)
    t0 = time.perf_counter()
    for idx in sorted_batches(data.lengths, batch_size):
        batch = {k: v.to(device) for k, v in collate(data, idx, pad_id, tt).items()}
        hidden = model(**batch).last_hidden_state
        out[idx] = mean_pool(hidden, batch["attention_mask"]).cpu().numpy()
    return out, len(data.ids) / max(time.perf_counter() - t0, 1e-9)


def probe(spec: ModelSpec, task: Task, cfg: FinetuneConfig, *, device: torch.device) -> dict[str, Any]:
    """Linear probe of frozen embeddings: embed every split once (:func:`embed`), standardise with the train split's
    mean and std, fit ``LogisticRegression(C, max_iter=1000)`` (classification; MTEB's classification protocol) or
    ``Ridge(alpha)`` (regression) on train for each value of :data:`PROBE_C` / :data:`PROBE_ALPHA`, keep the best on
    the select split (dev), report the reported splits. Returns the same keys as :func:`finetune` (``seed`` None,
    ``epoch`` None, ``c`` / ``alpha`` chosen, ``embed_examples_per_s``, ``fit_seconds``)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.path)
    with _quiet_transformers():
        model = AutoModel.from_pretrained(spec.path).to(device=device, dtype=torch.float32)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    feats, labels, speeds, n_embedded, t_embed = {}, {}, [], 0, 0.0
    for name, sp in task.splits.items():
        data = encode(tok, sp, cfg.max_length)
        t0 = time.perf_counter()
        feats[name], speed = embed(model, data, pad_id=pad_id, batch_size=cfg.eval_batch_size, device=device)
        t_embed += time.perf_counter() - t0
        n_embedded += len(sp)
        labels[name] = sp.labels
        if name in task.report_splits:
            speeds.append(speed)
    mu, sd = feats["train"].mean(0), feats["train"].std(0) + 1e-6
    feats = {k: (v - mu) / sd for k, v in feats.items()}
    regression = task.kind == REGRESSION
    select = task.select_split if task.select_split not in task.report_splits else None
    grid = PROBE_ALPHA if regression else PROBE_C
    t0 = time.perf_counter()
    best = None
    for value in grid if select is not None else (1.0,):
        clf = Ridge(alpha=value) if regression else LogisticRegression(C=value, max_iter=1000)
        clf.fit(feats["train"], labels["train"])
        dev = (
            score({select: compute_metrics(task.metrics, clf.predict(feats[select]), labels[select])})
            if select is not None
            else 0.0
        )
        if best is None or dev > best[0]:
            best = (dev, value, clf)
    dev, value, clf = best
    metrics = {s: compute_metrics(task.metrics, clf.predict(feats[s]), labels[s]) for s in task.report_splits}
    return {
        "seed": None,
        "metrics": metrics,
        "score": score(metrics),
        "dev_score": dev if select else None,
        "epoch": None,
        ("alpha" if regression else "c"): value,
        "fit_seconds": time.perf_counter() - t0,
        "embed_examples_per_s": n_embedded / max(t_embed, 1e-9),
        "inference_examples_per_s": float(np.mean(speeds)),
    }


# -------------------------------------------------------------------------------------------------------- the run
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Fill the aggregates of ``result`` in place: per task and model the mean and std over seeds of the score and
    of each metric, the share of the teacher's score; the macro average over tasks per model (std over seeds of
    the per-seed macro average); the gains of the student over each baseline (mean difference; spread =
    sqrt(std_student^2 + std_baseline^2), the seed-to-seed spread of the difference); per model the inference speed
    (mean over tasks). Returns ``result``."""
    teacher, student = result.get("teacher"), result.get("student")
    models = list(result["models"])
    per_seed: dict[str, list[list[float]]] = {m: [] for m in models}
    for tname, t in result["tasks"].items():
        for m, r in t["results"].items():
            runs = r["runs"]
            r["score_mean"], r["score_std"] = _mean_std([x["score"] for x in runs])
            r["metrics_mean"] = {
                f"{s}/{k}": _mean_std([x["metrics"][s][k] for x in runs])[0]
                for s in runs[0]["metrics"]
                for k in runs[0]["metrics"][s]
            }
            r["metrics_std"] = {
                f"{s}/{k}": _mean_std([x["metrics"][s][k] for x in runs])[1]
                for s in runs[0]["metrics"]
                for k in runs[0]["metrics"][s]
            }
            per_seed[m].append([x["score"] for x in runs])
        ref = t["results"].get(teacher, {}).get("score_mean")
        for m, r in t["results"].items():
            r["share_of_teacher"] = (r["score_mean"] / ref) if ref else None
    macro = {}
    for m in models:
        if not per_seed[m] or any(len(s) != len(per_seed[m][0]) for s in per_seed[m]):
            continue
        by_seed = np.mean(np.asarray(per_seed[m]), axis=0)
        macro[m] = dict(zip(("mean", "std"), _mean_std(by_seed), strict=False))
    ref = macro.get(teacher, {}).get("mean")
    for m in macro:
        macro[m]["share_of_teacher"] = macro[m]["mean"] / ref if ref else None
    result["macro"] = macro
    gains: dict[str, Any] = {}
    if student in models:
        for b in models:
            if b in (student, teacher):
                continue
            g = {}
            for tname, t in result["tasks"].items():
                s, o = t["results"].get(student), t["results"].get(b)
                if s and o:
                    g[tname] = _gain(s["score_mean"], s["score_std"], o["score_mean"], o["score_std"])
            if student in macro and b in macro and len(result["tasks"]) > 1:
                g["macro"] = _gain(macro[student]["mean"], macro[student]["std"], macro[b]["mean"], macro[b]["std"])
            gains[b] = g
    result["gains"] = gains
    for m in models:
        speeds = [
            x["inference_examples_per_s"]
            for t in result["tasks"].values()
            for x in t["results"].get(m, {}).get("runs", [])
        ]
        result["models"][m]["inference_examples_per_s"] = float(np.mean(speeds)) if speeds else None
    return result


def _gain(s_mean: float, s_std: float, b_mean: float, b_std: float) -> dict[str, Any]:
    spread = math.sqrt(s_std**2 + b_std**2)
    gain = s_mean - b_mean
    return {"gain": gain, "spread": spread, "beats_by_more_than_spread": bool(gain > spread)}


def run_downstream(
    tasks: Sequence[str],
    models: Sequence[ModelSpec] | dict[str, str],
    output: str | os.PathLike,
    *,
    mode: str = "finetune",
    seeds: int = 3,
    split: SplitConfig | None = None,
    fields: LocalFields | None = None,
    overrides: dict[str, Any] | None = None,
    teacher: str | None = None,
    student: str | None = None,
    device: str = "auto",
    save_model: str | os.PathLike | None = None,
    plot: bool = True,
    progress=None,
) -> dict[str, Any]:
    """Fine-tune (or probe) every model on every task with one protocol; write ``downstream.json``, ``downstream.md``
    and ``downstream.png`` into ``output`` (atomically, the JSON last) and return the result dict.

    Args:
        tasks: task specs (:func:`pretrain.tasks.load_task`).
        models: :class:`ModelSpec` list or ``{name: path}`` (ordered: the table's order).
        mode: ``finetune`` or ``probe``.
        seeds: fine-tuning runs per model and task (seeds 0..N-1), >= 1.
        split: split seed / fractions / caps; ``max_train`` / ``max_eval`` default per family
            (:func:`defaults_for`) when None.
        overrides: FinetuneConfig fields replacing the family defaults (e.g. ``{"epochs": 1}``).
        teacher / student: names of the reference model (shares) and the distilled student (gains); default
            ``teacher`` / ``student`` when present, else the first model / the last one unless it is a run's
            ``teacher``, ``student_init`` or ``truncation`` (then no gains are computed).
        progress: called with one line per finished run (default: print to stdout).
        save_model: folder: the seed-0 fine-tuned model of each model and task is saved to
            ``save_model/<model>/<task>`` (e.g. a fine-tuned teacher for task distillation).

    Returns:
        ``{"version", "complete": True, "mode", "seeds", "teacher", "student", "models": {name: {path, params,
        layers, hidden, inference_examples_per_s}}, "tasks": {task: {kind, metrics, report_splits, settings,
        manifest, results: {model: {runs: [...], score_mean, score_std, metrics_mean, metrics_std,
        share_of_teacher}}}}, "macro", "gains", "timing", "notes"}``. Scores are fractions (accuracy) or
        correlations, not percent.

    Raises:
        DownstreamError: bad seeds / mode / model / override; TaskError: bad task (see ``load_task``). Both before any
        training, so nothing is written; a previous ``downstream.json`` is moved to ``downstream.prev.json`` only
        once the inputs check out.
    """
    t_start = time.perf_counter()
    progress = progress or (lambda msg: print(msg, flush=True))
    if mode not in ("finetune", "probe"):
        raise DownstreamError(f"--mode {mode!r}: choose finetune or probe")
    if not isinstance(seeds, int) or seeds < 1:
        raise DownstreamError(f"--seeds {seeds}: give at least 1 (fine-tuning runs per model and task)")
    if not tasks:
        raise DownstreamError("no task given; known tasks: " + ", ".join(known_tasks()))
    specs = [ModelSpec(n, p) for n, p in models.items()] if isinstance(models, dict) else list(models)
    if not specs:
        raise DownstreamError("no model given: use --model NAME=PATH (repeatable) or --run RUNDIR")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DownstreamError(f"model names must be unique: {names}")
    overrides = dict(overrides or {})
    bad = [k for k in overrides if k not in {f.name for f in dataclasses.fields(FinetuneConfig)}]
    if bad:
        raise DownstreamError(f"unknown fine-tuning setting(s) {bad}")
    for key in ("epochs", "batch_size", "max_length", "eval_batch_size"):
        if key in overrides and (not isinstance(overrides[key], int) or overrides[key] < 1):
            raise DownstreamError(f"--{key.replace('_', '-')} {overrides[key]}: give a positive integer")
    if overrides.get("head", "cls") not in ("cls", "mean"):
        raise DownstreamError(f"--head {overrides['head']!r}: choose cls or mean")
    if "lr" in overrides and not overrides["lr"] > 0:
        raise DownstreamError(f"--lr {overrides['lr']}: give a positive learning rate")
    split = split or SplitConfig()
    dev_ = _device(device)
    loaded: list[tuple[Task, FinetuneConfig]] = []
    for spec in tasks:
        family = spec.partition(":")[0]
        cfg = defaults_for("glue" if family == "glue" else "other")
        for k2, v in overrides.items():
            setattr(cfg, k2, v)
        sc = dataclasses.replace(
            split,
            max_train=split.max_train if split.max_train is not None else cfg.max_train,
            max_eval=split.max_eval if split.max_eval is not None else cfg.max_eval,
        )
        cfg.max_train, cfg.max_eval = sc.max_train, sc.max_eval
        task = load_task(spec, split=sc, fields=fields)
        if task.name in [t.name for t, _ in loaded]:
            raise DownstreamError(f"task {task.name} given twice")
        loaded.append((task, cfg))
    for spec in specs:
        check_model(spec)
    teacher = teacher or ("teacher" if "teacher" in names else names[0])
    if student is None:  # a run without student/ has no distilled model: no gains then
        student = (
            "student" if "student" in names else (names[-1] if len(names) > 1 and names[-1] not in RUN_ROLES else None)
        )
    for flag, v in (("--teacher", teacher), ("--student", student)):
        if v is not None and v not in names:
            raise DownstreamError(f"{flag} {v}: not one of the models {names}")

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "downstream.json").exists():
        os.replace(out / "downstream.json", out / "downstream.prev.json")
    result: dict[str, Any] = {
        "version": RESULT_VERSION,
        "complete": False,
        "mode": mode,
        "seeds": seeds if mode == "finetune" else 1,
        "teacher": teacher,
        "student": student,
        "device": str(dev_),
        "torch_threads": torch.get_num_threads(),
        "models": {s.name: {"path": s.path, "params": s.params, "layers": s.layers, "hidden": s.hidden} for s in specs},
        "tasks": {},
        "notes": [],
    }
    n_seeds = seeds if mode == "finetune" else 1
    for task, cfg in loaded:
        entry = {
            "kind": task.kind,
            "metrics": list(task.metrics),
            "report_splits": list(task.report_splits),
            "select_split": task.select_split,
            "family": task.family,
            "label_names": task.label_names,
            "settings": dataclasses.asdict(cfg),
            "manifest": task.manifest,
            "results": {},
        }
        result["tasks"][task.name] = entry
        if task.name == "embedded:wiki-topic":
            result["notes"].append(
                "embedded:wiki-topic: the demo distils on these same Wikipedia texts without "
                "labels; its test split is the documents held out of the demo's distillation"
            )
        for spec in specs:
            runs = []
            for seed in range(n_seeds):
                t0 = time.perf_counter()
                if mode == "finetune":
                    save = (Path(save_model) / spec.name / _slug(task.name)) if save_model and seed == 0 else None
                    r = finetune(spec, task, cfg, seed, device=dev_, save_dir=save)
                else:
                    r = probe(spec, task, cfg, device=dev_)
                r["seconds"] = time.perf_counter() - t0
                runs.append(r)
                progress(
                    f"[downstream] {task.name} {spec.name} seed {seed}: score {r['score']:.4f} "
                    f"({_fmt_metrics(r['metrics'])}; {r['seconds']:.0f} s)"
                )
            entry["results"][spec.name] = {"runs": runs}
    summarise(result)
    result["timing"] = {"seconds": time.perf_counter() - t_start}
    result["complete"] = True
    write_outputs(result, out, plot=plot)
    return result


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _fmt_metrics(metrics: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{s} {k} {v:.4f}" for s, d in metrics.items() for k, v in d.items())


# ----------------------------------------------------------------------------------------------------- the report
def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _pm(mean: float, std: float, n: int) -> str:
    return f"{_pct(mean)} ± {_pct(std)}" if n > 1 else _pct(mean)


def render_downstream_markdown(result: dict[str, Any], png_name: str | None = None) -> str:
    """Markdown of a :func:`run_downstream` result: one table per task (model, parameters, inference examples/s, each
    metric and the score as mean ± std over seeds in percent, share of the teacher's score), the macro-average table
    and the gains of the distilled student over each baseline with the seed spread. ``png_name``: a bar chart to
    link. Pure function of ``result`` (the run report includes it)."""
    mode, seeds = result["mode"], result["seeds"]
    teacher, student = result.get("teacher"), result.get("student")
    what = (
        f"fine-tuned, {seeds} seed(s), mean ± std"
        if mode == "finetune"
        else "linear probe of frozen mean-pooled embeddings"
    )
    lines = [f"## Downstream evaluation ({what})", ""]
    lines.append(
        f"Scores in percent (accuracy, F1, correlations x 100). Teacher (share = 100%): `{teacher}`"
        + (f"; distilled student: `{student}`." if student else ".")
    )
    lines.append("")
    models = result["models"]
    for tname, t in result["tasks"].items():
        split_note = ", ".join(t["report_splits"])
        s = t["settings"]
        used = t["manifest"]["splits"]
        counts = ", ".join(f"{k} {v['used']['count']:,}" for k, v in used.items())
        lines.append(f"### {tname} ({t['kind']}; reported on {split_note}; {counts})")
        lines.append("")
        if mode == "finetune":
            lines.append(
                f"Settings: {s.get('head', 'cls')} head, {s['epochs']} epochs, lr {s['lr']:g}, batch {s['batch_size']}, "
                f"max length {s['max_length']}, warmup {s['warmup_ratio']:g}, weight decay "
                f"{s['weight_decay']:g}"
                + ("; epoch chosen on dev" if t["select_split"] not in t["report_splits"] else "")
                + "."
            )
            lines.append("")
        first = next(iter(t["results"].values()))
        mkeys = list(first["metrics_mean"])
        header = (
            ["model", "params", "inference ex/s"] + mkeys + (["score"] if len(mkeys) > 1 else []) + ["share of teacher"]
        )
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|")
        for m, r in t["results"].items():
            n = len(r["runs"])
            speed = np.mean([x["inference_examples_per_s"] for x in r["runs"]])
            row = [f"`{m}`", _params(models[m]["params"]), f"{speed:,.0f}"]
            row += [_pm(r["metrics_mean"][k], r["metrics_std"][k], n) for k in mkeys]
            if len(mkeys) > 1:
                row.append(_pm(r["score_mean"], r["score_std"], n))
            share = r.get("share_of_teacher")
            row.append("-" if share is None else f"{100 * share:.1f}%")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if result.get("macro") and len(result["tasks"]) > 1:
        lines += [
            "### Macro average over tasks",
            "",
            "| model | params | macro score | share of teacher |",
            "| --- | ---: | ---: | ---: |",
        ]
        for m, r in result["macro"].items():
            share = r.get("share_of_teacher")
            lines.append(
                f"| `{m}` | {_params(models[m]['params'])} | {_pm(r['mean'], r['std'], seeds)} | "
                + ("-" if share is None else f"{100 * share:.1f}%")
                + " |"
            )
        lines.append("")
    if result.get("gains"):
        lines += [
            f"### Gain of `{student}` over each baseline (points; spread = sqrt(std_student² + "
            "std_baseline²) over seeds)",
            "",
            "| baseline | task | gain | spread | beats by more than the spread |",
            "| --- | --- | ---: | ---: | --- |",
        ]
        for b, g in result["gains"].items():
            for tname, x in g.items():
                lines.append(
                    f"| `{b}` | {tname} | {100 * x['gain']:+.1f} | {100 * x['spread']:.1f} | "
                    f"{'yes' if x['beats_by_more_than_spread'] else 'no'} |"
                )
        lines.append("")
    if mode == "finetune":
        rows = [
            (m, np.mean([x["train_examples_per_s"] for t in result["tasks"].values() for x in t["results"][m]["runs"]]))
            for m in models
            if any(m in t["results"] for t in result["tasks"].values())
        ]
        lines.append(
            "Fine-tuning throughput (examples/s): "
            + ", ".join(f"`{m}` {v:,.0f}" for m, v in rows)
            + f"; total {result.get('timing', {}).get('seconds', 0):.0f} s on {result.get('device')} "
            f"({result.get('torch_threads')} threads)."
        )
        lines.append("")
    for note in result.get("notes", []):
        lines.append(f"Note: {note}.")
    if result.get("notes"):
        lines.append("")
    if png_name:
        lines += [f"![downstream scores]({png_name})", ""]
    return "\n".join(lines)


def plot_downstream(result: dict[str, Any], path: str | os.PathLike) -> bool:
    """A grouped bar chart (one group per task, plus the macro average when there are several tasks; one bar per
    model; error bars = std over seeds) written atomically as PNG to ``path``. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return False
    models = list(result["models"])
    groups = list(result["tasks"])
    vals = {m: [result["tasks"][t]["results"][m]["score_mean"] * 100 for t in groups] for m in models}
    errs = {m: [result["tasks"][t]["results"][m]["score_std"] * 100 for t in groups] for m in models}
    if len(groups) > 1 and result.get("macro"):
        groups.append("macro average")
        for m in models:
            vals[m].append(result["macro"][m]["mean"] * 100)
            errs[m].append(result["macro"][m]["std"] * 100)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups) * max(1, len(models)) / 2), 3.6))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(groups))
    for i, m in enumerate(models):
        ax.bar(x + (i - (len(models) - 1) / 2) * width, vals[m], width, yerr=errs[m], capsize=3, label=m)
    lo = min(min(v) for v in vals.values())
    hi = max(max(v) for v in vals.values())
    ax.set_ylim(max(0, lo - 0.2 * (hi - lo + 1) - 2), hi + 0.15 * (hi - lo + 1) + 1)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_title(f"downstream ({result['mode']}, {result['seeds']} seed(s), mean ± std)", fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, len(models)))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def write_outputs(result: dict[str, Any], output: str | os.PathLike, *, plot: bool = True) -> None:
    """Write ``downstream.png`` (if ``plot``), ``downstream.md`` and, last, ``downstream.json`` into ``output``,
    each atomically (:mod:`data_prep.files`), so a ``downstream.json`` present is always a complete result."""
    out = Path(output)
    png = plot and plot_downstream(result, out / "downstream.png")
    atomic_write_text(out / "downstream.md", render_downstream_markdown(result, "downstream.png" if png else None))
    atomic_write_text(out / "downstream.json", json.dumps(result, indent=1, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ------------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pretrain.downstream",
        description="Fine-tune (or probe) models on labeled tasks and write downstream.json / .md / .png. "
        f"Tasks: {', '.join(known_tasks())}.",
    )
    p.add_argument(
        "--task",
        action="append",
        default=None,
        metavar="SPEC",
        help=f"task (repeatable); default {DEFAULT_TASK}. Offline: {', '.join(OFFLINE_TASKS)}",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a model folder, hub name or embedded:NAME under a display name (repeatable)",
    )
    p.add_argument(
        "--run",
        metavar="RUNDIR",
        help="a distillation run: teacher, student_init, truncation baseline (built), student",
    )
    p.add_argument("--output", metavar="DIR", help="where to write downstream.*; default RUNDIR/downstream")
    p.add_argument("--mode", choices=("finetune", "probe"), default="finetune")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning runs per model and task (seeds 0..N-1)")
    p.add_argument("--teacher", help="model the shares refer to (default: teacher, else the first)")
    p.add_argument("--student", help="the distilled model compared with the baselines (default: student, else last)")
    g = p.add_argument_group("fine-tuning settings (default: per task family, see docs/downstream.md)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--max-length", type=int, help="tokens per example (truncation)")
    g.add_argument("--warmup-ratio", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--max-train", type=int, help="cap on train examples (stratified); 0 = all")
    g.add_argument("--max-eval", type=int, help="cap on each evaluation split (stratified); 0 = all")
    g.add_argument(
        "--head",
        choices=("cls", "mean"),
        help="cls (default): AutoModelForSequenceClassification; mean: a linear head on mean-pooled "
        "states (for sentence encoders such as the demo's teacher)",
    )
    s = p.add_argument_group("splits and local files")
    s.add_argument("--split-seed", type=int, default=0, help="seed of the deterministic splits and caps")
    s.add_argument("--text-field", default="text")
    s.add_argument("--pair-field", default=None, help="second text of pair tasks (csv/jsonl)")
    s.add_argument("--label-field", default="label")
    s.add_argument("--task-type", choices=("auto", "classification", "regression"), default="auto")
    p.add_argument("--save-model", metavar="DIR", help="save each seed-0 fine-tuned model to DIR/<model>/<task>")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--list-tasks", action="store_true", help="print the known tasks and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The CLI; exit status 0 on success, 2 on a user error (message on stderr, no ``downstream.json`` written)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.list_tasks:
        from pretrain.tasks import EMBEDDED, GLUE

        for t in GLUE:
            print(f"glue:{t}\t{', '.join(GLUE[t][2])} (hub)")
        for t, what in EMBEDDED.items():
            print(f"embedded:{t}\t{what} (offline)")
        print("csv:PATH / jsonl:PATH\tlocal file or folder with train/dev[/test] files")
        return 0
    try:
        if args.output is None and args.run is None:
            raise DownstreamError("--output DIR is required without --run")
        if args.seeds < 1:  # before building anything
            raise DownstreamError(f"--seeds {args.seeds}: give at least 1 (fine-tuning runs per model and task)")
        output = Path(args.output or Path(args.run) / "downstream")
        models: list[ModelSpec] = []
        if args.run:
            models += run_models(args.run, output)
        for item in args.model:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise DownstreamError(f"--model {item!r}: expected NAME=PATH")
            models.append(ModelSpec(name, path))
        overrides = {
            k: getattr(args, k)
            for k in ("epochs", "lr", "batch_size", "max_length", "warmup_ratio", "weight_decay", "head")
            if getattr(args, k) is not None
        }
        split = SplitConfig(
            seed=args.split_seed,
            max_train=None if args.max_train is None else (args.max_train or 10**12),
            max_eval=None if args.max_eval is None else (args.max_eval or 10**12),
        )
        fields = LocalFields(text=args.text_field, pair=args.pair_field, label=args.label_field, kind=args.task_type)
        result = run_downstream(
            args.task or [DEFAULT_TASK],
            models,
            output,
            mode=args.mode,
            seeds=args.seeds,
            split=split,
            fields=fields,
            overrides=overrides,
            teacher=args.teacher,
            student=args.student,
            device=args.device,
            save_model=args.save_model,
            plot=not args.no_plot,
        )
    except (DownstreamError, TaskError, DataPrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render_downstream_markdown(result))
    print(f"[downstream] wrote {output / 'downstream.json'}, downstream.md, downstream.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
