"""Task distillation: a fine-tuned classifier teaches a smaller classifier on labeled examples, on the same trainer.

The ``task`` config section names the task (the tasks of :mod:`pretrain.tasks`: ``glue:sst2``,
``embedded:rotten-tomatoes``, ``csv:PATH`` ...); the run then distils with :class:`TaskRecipe` instead of the shards'
MLM recipe, with the same DeepSpeed engine, ZeRO stages, precision, accumulation, checkpoints and exact resume, stop
signals, SLURM submission, metrics and stages (:mod:`pretrain.stages`, TinyBERT's two steps).

- Teacher: a ``*ForSequenceClassification`` whose labels are the task's (fine-tune one with ``python -m
  pretrain.downstream --task T --model teacher=PATH --save-model DIR``).
- Student: (a) the teacher's layers (``student.layers``) with its classification head copied (the DistilBERT
  initialisation, :func:`pretrain.student.build_student` on the classifier); (b) ``task.student``: a task-agnostic
  distilled encoder (a run's ``student/``), with the teacher's head copied (``task.head: "teacher"``) or a new one
  (``"new"``): general distillation, then task distillation (TinyBERT, Jiao et al. 2020; DistilBERT(D), Sanh et al.
  2019 sec. 4.2); (c) ``student.init: "random"`` (any width: TinyBERT projections for the hidden losses).
- Losses (:class:`TaskDistillationModel`, the terms of :mod:`pretrain.losses`): ``alpha_label`` x the label
  cross-entropy (MSE for regression), ``alpha_ce`` x KL(T) x T^2 between the class distributions (MSE between the
  outputs for regression), ``alpha_prob_cos`` x (1 - cosine of the softened class distributions), and the hidden and
  relation terms (``alpha_cos``, ``alpha_mse``, ``alpha_att``, ``alpha_val``, ``alpha_pool``) with the layer pairs of the
  pretraining recipe.
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

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pretrain import losses as L
from pretrain.data import BatchLoader, DataOrder
from pretrain.distill import DistillationModel
from pretrain.schema import ConfigError, check, param

CLASSIFIER_SUFFIX = "ForSequenceClassification"
LOGIT_TERMS = {"label", "ce", "prob_cos"}


@dataclasses.dataclass
class TaskConfig:
    """Task distillation (docs/task-distillation.md): a fine-tuned classifier teacher and labeled examples instead of
    shards. Without ``name`` the run is task-agnostic distillation on ``data.dir``."""

    name: str | None = param(
        None,
        help='The task: "glue:sst2" (any GLUE task, needs the hub), '
        '"embedded:rotten-tomatoes" (offline tasks of pretrain.tasks), "csv:PATH" or '
        '"jsonl:PATH"; null = task-agnostic distillation on data.dir.',
    )
    text_field: str = param("text", help="csv/jsonl tasks: the text field.")
    pair_field: str | None = param(None, help="csv/jsonl tasks: the second text field of pair tasks (null: none).")
    label_field: str = param("label", help="csv/jsonl tasks: the label field.")
    max_length: int = param(128, help="Tokens per example (longer ones are truncated).")
    split_seed: int = param(
        0,
        help="Seed of the deterministic train / dev / test split of embedded and local tasks "
        "(the one python -m pretrain.downstream uses by default).",
    )
    max_train_examples: int | None = param(None, help="Stratified cap on the train split (null = all).")
    max_eval_examples: int | None = param(1000, help="Stratified cap on each evaluation split (null = all).")
    eval_split: str = param(
        "dev",
        help='Split evaluated during training: "dev" (choose settings there; the test '
        'split is for the report) or "test".',
    )
    teacher_logits: Literal["on_the_fly", "precompute"] = param(
        "on_the_fly",
        help='"on_the_fly": the teacher runs every step; "precompute": its logits for every training '
        "example are computed once into RUN/teacher_logits.pt (verified by hash, reused), for "
        "losses that read only the logits (alpha_label, alpha_ce, alpha_prob_cos).",
    )
    student: str | None = param(
        None,
        help="Two-step distillation: a task-agnostic distilled encoder (a run's "
        "student/ directory) to start from instead of the teacher's layers; its "
        "depth must match student.layers (the layer pairs).",
    )
    head: Literal["teacher", "new"] = param(
        "teacher",
        help='With task.student: copy the teacher\'s classification head ("teacher", when the widths '
        'match) or start a new one ("new").',
    )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming ``task.<key>``."""
        check(self.max_length >= 8, "task.max_length", f"{self.max_length} must be >= 8")
        for key in ("max_train_examples", "max_eval_examples"):
            v = getattr(self, key)
            check(v is None or v >= 2, f"task.{key}", f"{v} must be >= 2 or null")
        check(self.eval_split in ("dev", "test"), "task.eval_split", f"{self.eval_split!r} is not 'dev' or 'test'")


def check_run_config(cfg) -> None:
    """Cross-section rules of task mode (``cfg``: RunConfig), or of task-agnostic mode when ``task.name`` is null.
    Raises :class:`ConfigError`."""
    from pretrain.stages import stage_losses

    task_mode = bool(cfg.task.name)
    for i, loss in enumerate(stage_losses(cfg)):
        where = "loss" if not cfg.train.stages else f"train.stages[{i}].loss"
        active = loss.active()
        if task_mode:
            check(
                "mlm" not in active,
                f"{where}.alpha_mlm",
                f"{loss.alpha_mlm}: task distillation has no masked tokens; set it to 0",
            )
        else:
            for term in L.TASK_TERMS:
                check(
                    term not in active,
                    f"{where}.alpha_{term}",
                    "is for task distillation (set task.name); set it to 0 for distillation on data.dir",
                )
        if task_mode and cfg.task.teacher_logits == "precompute":
            check(
                set(active) <= LOGIT_TERMS,
                "task.teacher_logits",
                f"'precompute' needs a loss on the logits only ({', '.join('alpha_' + t for t in sorted(LOGIT_TERMS))}"
                f"); {where} also has {sorted(set(active) - LOGIT_TERMS)}, for which the teacher runs anyway: use "
                f"'on_the_fly'",
            )
    if task_mode:
        check(
            cfg.student.architecture == "same",
            "student.architecture",
            f"{cfg.student.architecture!r}: task distillation keeps the teacher's class ('same')",
        )
        check(
            cfg.student.init != "prune",
            "student.init",
            "'prune' measures importance on data.dir's shards, which task distillation does not read; prune in a "
            "task-agnostic run and give its student/ as task.student, or use 'teacher' or 'random'",
        )
    else:
        check(
            bool(cfg.data.dir.strip()),
            "data.dir",
            "is empty; give the shard directory of `python -m data_prep "
            "prepare` (or set task.name for task distillation)",
        )


# ------------------------------------------------------------------------------------------------------- the model
class TaskDistillationModel(DistillationModel):
    """Student classifier + frozen teacher classifier + the task losses (see the module docstring).

    Args: as :class:`pretrain.distill.DistillationModel` (layer pairs, TinyBERT projections and MiniLM relations are
    built the same way); ``regression``: the task is a regression (one output).
    """

    def __init__(self, student, teacher, loss_cfg, layer_map, *, regression: bool):
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
                    t_out = self._teacher(input_ids=input_ids, **kw)
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


# -------------------------------------------------------------------------------------------------------- the data
@dataclasses.dataclass
class TaskExamples:
    """Tokenized examples of one split: ``ids[i]`` / ``types[i]`` int64 [len_i] (types None without segment ids),
    ``labels`` [n], ``teacher_logits`` float32 [n, C] when precomputed."""

    ids: list[np.ndarray]
    types: list[np.ndarray] | None
    labels: np.ndarray
    teacher_logits: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> int:
        return i  # the loader collates by index (collate_examples)

    def digest(self) -> str:
        """sha256 of the token ids, segment ids and labels (the teacher-logit cache's input key)."""
        h = hashlib.sha256()
        for i, ids in enumerate(self.ids):
            h.update(ids.tobytes())
            if self.types is not None:
                h.update(self.types[i].tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()


def collate_examples(data: TaskExamples, index, pad_id: int, multiple: int, regression: bool) -> dict:
    """Right-pad examples ``index`` into a micro-batch: ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``)
    int64 [B, L] (L rounded up to ``multiple``), ``labels`` [B] (int64, float32 for regression) and
    ``teacher_logits`` float32 [B, C] when precomputed."""
    index = [int(i) for i in index]
    width = -(-max(len(data.ids[i]) for i in index) // multiple) * multiple
    ids = np.full((len(index), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    types = None if data.types is None else np.zeros_like(ids)
    for r, i in enumerate(index):
        n = len(data.ids[i])
        ids[r, :n], mask[r, :n] = data.ids[i], 1
        if types is not None:
            types[r, :n] = data.types[i]
    out = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(data.labels[index].astype(np.float32 if regression else np.int64)),
    }
    if types is not None:
        out["token_type_ids"] = torch.from_numpy(types)
    if data.teacher_logits is not None:
        out["teacher_logits"] = torch.from_numpy(data.teacher_logits[index])
    return out


def tokenize(tokenizer, split, max_length: int, segment_ids: bool) -> TaskExamples:
    """Tokenize a :class:`pretrain.tasks.Split` (texts, optional pairs) with truncation to ``max_length`` tokens."""
    enc = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length, return_token_type_ids=segment_ids)
    types = enc.get("token_type_ids") if segment_ids else None
    return TaskExamples(
        [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]],
        None if types is None else [np.asarray(x, dtype=np.int64) for x in types],
        np.asarray(split.labels),
    )


# ------------------------------------------------------------------------------------------------------ the recipe
class TaskRecipe:
    """Task distillation (see the module docstring); the trainer composes it like
    :class:`pretrain.recipes.PretrainRecipe`."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.tc = cfg.task
        self.model: TaskDistillationModel | None = None  # build_model's; its teacher computes precomputed logits

    # -- before any weights ------------------------------------------------------------------------------------
    def preflight(self, world_size: int) -> None:
        """Load the task and check the teacher (a classifier of the task's labels), the student and the splits;
        raises :class:`ConfigError` naming the key and what to do."""
        from transformers import AutoConfig, AutoTokenizer

        from data_prep.embedded import resolve_model
        from data_prep.errors import DataPrepError
        from pretrain.tasks import LocalFields, SplitConfig, TaskError, load_task

        name = self.cfg.teacher.name_or_path
        try:
            self.teacher_path = resolve_model(name)
            tconf = AutoConfig.from_pretrained(self.teacher_path, revision=self.cfg.teacher.revision)
            self.tokenizer = AutoTokenizer.from_pretrained(self.teacher_path, revision=self.cfg.teacher.revision)
        except (DataPrepError, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"teacher.name_or_path: {name!r} cannot be loaded ({first})") from None
        try:
            self.task = load_task(
                self.tc.name,
                split=SplitConfig(
                    seed=self.tc.split_seed, max_train=self.tc.max_train_examples, max_eval=self.tc.max_eval_examples
                ),
                fields=LocalFields(self.tc.text_field, self.tc.pair_field, self.tc.label_field),
            )
        except (TaskError, DataPrepError) as e:
            raise ConfigError(f"task.name: {e}") from None
        self._check_teacher(tconf)
        self.teacher_config = tconf
        if self.tc.student:
            self._check_student(tconf)
        if self.tc.eval_split not in self.task.splits:
            raise ConfigError(
                f"task.eval_split: {self.task.name} has no {self.tc.eval_split!r} split "
                f"(splits: {sorted(self.task.splits)})"
            )
        self.info = None

    def _check_teacher(self, tconf) -> None:
        from pretrain.tasks import REGRESSION

        name, task = self.cfg.teacher.name_or_path, self.task
        archs = getattr(tconf, "architectures", None) or []
        if not any(a.endswith(CLASSIFIER_SUFFIX) for a in archs):
            raise ConfigError(
                f"teacher.name_or_path: {name!r} has no classification head (architectures {archs}); task "
                f"distillation needs a teacher fine-tuned on {task.name}: make one with `python -m pretrain.downstream "
                f"--task {task.name} --model teacher={name} --seeds 1 --save-model DIR` and give DIR"
            )
        regression = task.kind == REGRESSION
        if (tconf.num_labels == 1) != regression or tconf.num_labels != task.num_labels:
            raise ConfigError(
                f"teacher.name_or_path: {name!r} has a head of {tconf.num_labels} output(s) "
                f"({getattr(tconf, 'problem_type', None) or 'classification'}), the task {task.name} is a "
                f"{task.kind} with {task.num_labels} output(s); use a teacher fine-tuned on this task"
            )
        names = [tconf.id2label[i] for i in range(tconf.num_labels)]
        generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
        if not regression and not generic and names != list(task.label_names):
            raise ConfigError(
                f"teacher.name_or_path: {name!r} names its classes {names}, the task {task.name} "
                f"{list(task.label_names)}; use a teacher fine-tuned on this task (same label order)"
            )

    def _check_student(self, tconf) -> None:
        from transformers import AutoConfig

        from pretrain.student import resolve_layer_map

        path = Path(self.tc.student)
        try:
            sconf = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"task.student: {str(path)!r} is not a model directory ({e}); give a run's student/ folder"
            ) from None
        if sconf.vocab_size != tconf.vocab_size:
            raise ConfigError(
                f"task.student: {str(path)!r} has a vocabulary of {sconf.vocab_size} tokens, the "
                f"teacher {tconf.vocab_size}; distil a student of this teacher (same tokenizer)"
            )
        depth = len(resolve_layer_map(self.cfg.student.layers, tconf.num_hidden_layers))
        if sconf.num_hidden_layers != depth:
            raise ConfigError(
                f"student.layers: {self.cfg.student.layers!r} gives {depth} layers, task.student has "
                f"{sconf.num_hidden_layers}; set student.layers to the layer map it was distilled with"
            )

    @property
    def regression(self) -> bool:
        from pretrain.tasks import REGRESSION

        return self.task.kind == REGRESSION

    # -- models ------------------------------------------------------------------------------------------------
    def load_teacher(self) -> torch.nn.Module:
        """The fine-tuned teacher classifier, fp32, eval mode."""
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            self.teacher_path,
            revision=self.cfg.teacher.revision,
            dtype=torch.float32,
            attn_implementation=self.cfg.teacher.attn_implementation,
        )
        return model.eval()

    def build_student(self, teacher) -> tuple[torch.nn.Module, dict[str, Any]]:
        """(a) the teacher's layers and head (:func:`pretrain.student.build_student`), or (b) ``task.student`` with
        the teacher's head or a new one. Label names go into the student's config for the export."""
        from pretrain.student import build_student, resolve_layer_map

        if not self.tc.student:
            student, record = build_student(teacher, self.cfg.student)
        else:
            student, record = self._pretrained_student(teacher)
            record["layer_map"] = resolve_layer_map(self.cfg.student.layers, teacher.config.num_hidden_layers)
        labels = list(self.task.label_names) if not self.regression else ["score"]
        student.config.id2label = dict(enumerate(labels))
        student.config.label2id = {n: i for i, n in enumerate(labels)}
        if self.regression:
            student.config.problem_type = "regression"
        return student, record

    def _pretrained_student(self, teacher) -> tuple[torch.nn.Module, dict[str, Any]]:
        from transformers import AutoModelForSequenceClassification

        student = AutoModelForSequenceClassification.from_pretrained(
            self.tc.student, num_labels=teacher.config.num_labels, dtype=torch.float32
        )
        copied, notes = {}, [f"encoder from {self.tc.student}"]
        t_state = teacher.state_dict()
        base = student.base_model_prefix
        head = {
            k: v
            for k, v in student.state_dict().items()
            if not k.startswith(base + ".") or k.startswith(f"{base}.pooler.")
        }
        if self.tc.head == "teacher":
            fits = all(k in t_state and t_state[k].shape == v.shape for k, v in head.items())
            if not fits:
                raise ConfigError(
                    f"task.head: the teacher's head does not fit the student from {self.tc.student} "
                    f"(other widths); use task.head='new'"
                )
            student.load_state_dict({k: t_state[k] for k in head}, strict=False)
            copied = {k: k for k in head}
            notes.append("classification head copied from the teacher")
        else:
            notes.append("new classification head (random, seeded)")
        return student.float().train(), {
            "copied": copied,
            "initialized": [] if copied else sorted(head),
            "notes": notes,
            "init": "task.student",
            "student_class": type(student).__name__,
        }

    def build_model(self, student, teacher, record: dict, loss_cfg) -> TaskDistillationModel:
        """The module DeepSpeed wraps: :class:`TaskDistillationModel` (kept: its teacher computes the precomputed
        logits, on the device and in the dtype the trainer gave it)."""
        self.model = TaskDistillationModel(student, teacher, loss_cfg, record["layer_map"], regression=self.regression)
        return self.model

    def head_rows_key(self) -> str:
        return "n_masked"

    # -- data --------------------------------------------------------------------------------------------------
    def _examples(self, split: str) -> TaskExamples:
        segment_ids = (getattr(self.teacher_config, "type_vocab_size", 0) or 0) > 1
        return tokenize(self.tokenizer, self.task.splits[split], self.tc.max_length, segment_ids)

    def train_loader(self, plan, *, world_size: int, rank: int, pin_memory: bool) -> BatchLoader:
        """The resumable loader over the tokenized train split (teacher logits attached when precomputed)."""
        self.train = self._examples("train")
        if self.tc.teacher_logits == "precompute":
            self.train.teacher_logits = self._teacher_logits_cache()
        order = DataOrder(
            len(self.train),
            micro_batch=plan.micro_batch,
            world_size=world_size,
            rank=rank,
            seed=self.cfg.train.seed,
            shuffle=self.cfg.data.shuffle,
        )
        pad, multiple, regression = self.tokenizer.pad_token_id, self.cfg.data.pad_to_multiple_of, self.regression
        return BatchLoader(
            self.train,
            order,
            pad_id=pad,
            prefetch=self.cfg.data.prefetch,
            pin_memory=pin_memory,
            collate_fn=lambda idx: collate_examples(self.train, idx, pad, multiple, regression),
        )

    def inputs(
        self, batch: dict[str, torch.Tensor], device: torch.device, *, step: int, rank: int, micro_step: int
    ) -> tuple:
        """(input_ids, attention_mask, labels, token_type_ids, teacher_logits) on the device (no masking)."""
        get = lambda k: None if k not in batch else batch[k].to(device, non_blocking=True)  # noqa: E731
        return (get("input_ids"), get("attention_mask"), get("labels"), get("token_type_ids"), get("teacher_logits"))

    def _teacher_logits_cache(self) -> np.ndarray:
        """The teacher's logits for every train example [n, C] float32, from ``RUN/teacher_logits.pt`` when its key
        (teacher weights + tokenized examples + the teacher's dtype) matches, else computed by the trainer's teacher
        and saved (rank 0; other ranks wait)."""
        import torch.distributed as dist

        from data_prep.files import atomic_path, sha256_file
        from pretrain.rundir import RunDir
        from pretrain.runtime import console, on_rank0

        path = RunDir(self.cfg.train.output_dir).root / "teacher_logits.pt"
        weights = sorted(Path(self.teacher_path).glob("*.safetensors")) + sorted(Path(self.teacher_path).glob("*.bin"))
        key = hashlib.sha256(
            json.dumps(
                {
                    "teacher": [sha256_file(w) for w in weights] or self.teacher_path,
                    "examples": self.train.digest(),
                    "dtype": str(self.model.teacher.dtype),
                }
            ).encode()
        ).hexdigest()

        def compute() -> None:
            if path.is_file() and torch.load(path, weights_only=True)["key"] == key:
                console(f"[pretrain] teacher logits: reusing {path} (key matches)")
                return
            logits = self._run_teacher(self.train)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save({"key": key, "logits": torch.from_numpy(logits)}, tmp)
            console(f"[pretrain] teacher logits: computed for {len(self.train)} examples -> {path}")

        on_rank0(compute, rank=dist.get_rank() if dist.is_initialized() else 0)
        saved = torch.load(path, weights_only=True)
        if saved["key"] != key:
            raise RuntimeError(f"{path}: the teacher-logit cache does not match this run's teacher and examples")
        return saved["logits"].numpy()

    @torch.no_grad()
    def _run_teacher(self, data: TaskExamples, batch_size: int = 64) -> np.ndarray:
        """The teacher's logits [n, C] float32 for ``data``, by the trainer's teacher (on its device, in its dtype:
        fp32 on CPU, half precision on GPU)."""
        teacher = self.model.teacher
        device = next(teacher.parameters()).device
        order = np.argsort([-len(x) for x in data.ids], kind="stable")
        out = np.zeros((len(data), teacher.config.num_labels), dtype=np.float32)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            b = collate_examples(data, idx, self.tokenizer.pad_token_id, 8, self.regression)
            kw = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
            out[idx] = teacher(**kw).logits.float().cpu().numpy()
        return out

    def validator(self, model, plan, *, world_size: int, rank: int, device: torch.device, all_reduce):
        """The in-run evaluation on ``task.eval_split`` (:class:`TaskValidator`), or None with train.evaluate=false."""
        if not self.cfg.train.evaluate:
            return None
        return TaskValidator(
            model,
            self._examples(self.tc.eval_split),
            self.task,
            self.tc.eval_split,
            pad_id=self.tokenizer.pad_token_id,
            micro_batch=max(plan.micro_batch, 32),
            world_size=world_size,
            rank=rank,
            device=device,
            regression=self.regression,
        )

    # -- export ------------------------------------------------------------------------------------------------
    def prepare_export(self, is_main: bool) -> None:
        pass

    def write_meta(self, folder: Path, student: torch.nn.Module) -> None:
        """The student's config (with its label names), the tokenizer."""
        from pretrain.export import write_hf_meta

        write_hf_meta(folder, student.config, self.tokenizer, {}, type(student).__name__)


class TaskValidator:
    """The task metric of the student (and, once, of the teacher) on one split; collective over the ranks: each rank
    predicts its rank-strided share, rank 0 gathers and scores (:func:`pretrain.tasks.compute_metrics`)."""

    def __init__(
        self,
        model,
        data: TaskExamples,
        task,
        split: str,
        *,
        pad_id: int,
        micro_batch: int,
        world_size: int,
        rank: int,
        device: torch.device,
        regression: bool,
    ):
        self.model, self.data, self.task, self.split = model, data, task, split
        self.pad_id, self.micro, self.world, self.rank = pad_id, micro_batch, world_size, rank
        self.device, self.regression = device, regression
        self.teacher_metrics: dict[str, float] | None = None
        self.teacher_done = False  # the same on every rank: the teacher's predictions are gathered once

    def _predict(self, module) -> tuple[np.ndarray, np.ndarray]:
        mine = np.arange(self.rank, len(self.data), self.world)
        preds, index = [], []
        for s in range(0, len(mine), self.micro):
            idx = mine[s : s + self.micro]
            b = {
                k: v.to(self.device)
                for k, v in collate_examples(self.data, idx, self.pad_id, 8, self.regression).items()
                if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            logits = module(**b).logits.float()
            preds.append((logits[:, 0] if self.regression else logits.argmax(-1)).cpu().numpy())
            index.append(idx)
        return (np.concatenate(preds) if preds else np.zeros(0)), (np.concatenate(index) if index else np.zeros(0))

    def _gather(self, module) -> np.ndarray | None:
        import torch.distributed as dist

        preds, index = self._predict(module)
        parts = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(parts, (preds, index))
        else:
            parts = [(preds, index)]
        if self.rank != 0:
            return None
        out = np.zeros(len(self.data), dtype=np.float32 if self.regression else np.int64)
        for p, i in parts:
            out[i.astype(np.int64)] = p
        return out

    @torch.no_grad()
    def run(self, step: int) -> dict[str, Any]:
        """Evaluate; returns the ``"split": "valid"`` record (complete on rank 0)."""
        from pretrain.tasks import compute_metrics, score

        student = self._gather(self.model.student)
        teacher = None
        if not self.teacher_done:
            teacher = self._gather(self.model.teacher)
            self.teacher_done = True
        rec: dict[str, Any] = {
            "split": "valid",
            "step": step,
            "task": self.task.name,
            "eval_split": self.split,
            "examples": len(self.data),
        }
        if self.rank != 0:
            return rec
        labels = self.data.labels
        metrics = compute_metrics(self.task.metrics, student, labels)
        if teacher is not None:
            self.teacher_metrics = compute_metrics(self.task.metrics, teacher, labels)
            self._teacher_preds = teacher
        rec.update({f"task_{k}": v for k, v in metrics.items()})
        rec["task_score"] = score({self.split: metrics})
        rec["teacher_score"] = score({self.split: self.teacher_metrics})
        if not self.regression:
            rec["agreement"] = float((student == self._teacher_preds).mean())
        return rec


# ------------------------------------------------------------------------------------------------------- evaluate
def evaluate_classifier(
    model_dir: str, task, split: str, *, max_length: int = 128, batch_size: int = 128, device: str = "cpu"
) -> dict[str, Any]:
    """A saved classifier's metrics on ``split`` of ``task`` as it is (no fine-tuning): ``{"metrics", "score",
    "examples_per_s", "params"}``; the same tokenization and metrics as the in-run evaluation (:class:`TaskValidator`).
    Encoder parameters exclude the pooler and the head."""
    import time

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pretrain.tasks import REGRESSION, compute_metrics, score

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).to(device).eval()
    segment_ids = (getattr(model.config, "type_vocab_size", 0) or 0) > 1
    data = tokenize(tok, task.splits[split], max_length, segment_ids)
    regression = task.kind == REGRESSION
    preds = np.zeros(len(data), dtype=np.float32 if regression else np.int64)
    order = np.argsort([-len(x) for x in data.ids], kind="stable")
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            b = collate_examples(data, idx, tok.pad_token_id, 8, regression)
            kw = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
            logits = model(**kw).logits.float()
            preds[idx] = (logits[:, 0] if regression else logits.argmax(-1)).cpu().numpy()
    seconds = time.perf_counter() - t0
    metrics = compute_metrics(task.metrics, preds, data.labels)
    encoder = model.base_model
    return {
        "metrics": metrics,
        "score": score({split: metrics}),
        "examples_per_s": len(data) / max(seconds, 1e-9),
        "params": sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("pooler.")),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.taskmode evaluate --model NAME=DIR ... --task T [--split test]``: metrics of saved
    classifiers on a task split, as they are (JSON on stdout); exit 2 on bad input."""
    import argparse
    import sys

    from pretrain.tasks import SplitConfig, TaskError, load_task

    p = argparse.ArgumentParser(prog="python -m pretrain.taskmode", description=main.__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("evaluate", help="score saved classifiers on a task split")
    e.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    e.add_argument("--task", required=True)
    e.add_argument("--split", default="test")
    e.add_argument("--split-seed", type=int, default=0)
    e.add_argument("--max-eval", type=int, default=1000, help="cap on the split (stratified; 0 = all)")
    e.add_argument("--max-length", type=int, default=128)
    args = p.parse_args(argv)
    try:
        task = load_task(args.task, split=SplitConfig(seed=args.split_seed, max_eval=args.max_eval or None))
        if args.split not in task.splits:
            raise TaskError(f"--split {args.split}: {task.name} has {sorted(task.splits)}")
        models = dict(m.split("=", 1) for m in args.model)
    except (TaskError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = {}
    for name, path in models.items():
        try:
            out[name] = evaluate_classifier(path, task, args.split, max_length=args.max_length)
        except OSError as err:
            print(f"error: --model {name}={path}: {err}", file=sys.stderr)
            return 2
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
