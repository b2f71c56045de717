"""The task-distillation recipe: what the trainer composes for a run with ``task.name`` set (docs/task-distillation.md;
the loss module is :class:`pretrain.tasks.distill.TaskDistillationModel`).

:func:`pretrain.recipes.make_recipe` picks :class:`TaskRecipe` (imported lazily) or the shards' ``PretrainRecipe``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from pretrain.data import BatchLoader, DataOrder
from pretrain.tasks.base import REGRESSION
from pretrain.tasks.distill import TaskDistillationModel
from pretrain.tasks.examples import Examples, collate, encode, sorted_batches, uses_segment_ids
from pretrain.tasks.predict import run_batches
from pretrain.tasks.preflight import (
    check_eval_split,
    check_loss,
    check_student,
    check_teacher,
    load_task_of,
    load_teacher_files,
    pretrained_student,
)
from pretrain.tasks.validator import TaskValidator


class TaskRecipe:
    """Task distillation (see :mod:`pretrain.tasks.distill`); the trainer composes it like
    :class:`pretrain.recipes.PretrainRecipe`. ``cfg``: the run config (a recipe reads several sections; the parts
    below it take only theirs)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.tc = cfg.task
        self.model: TaskDistillationModel | None = None  # build_model's; its teacher computes precomputed logits

    # -- before any weights ------------------------------------------------------------------------------------
    def preflight(self, world_size: int) -> None:
        """Load the task and check the teacher (a classifier of the task's labels), the student and the splits;
        raises :class:`pretrain.schema.ConfigError` naming the key and what to do."""
        self.teacher_path, tconf, self.tokenizer = load_teacher_files(self.cfg.teacher)
        self.task = load_task_of(self.tc)
        check_teacher(tconf, self.cfg.teacher.name_or_path, self.task)
        check_loss(self.cfg.loss, self.task)
        self.teacher_config = tconf
        if self.tc.student:
            check_student(self.tc, self.cfg.student.layers, tconf)
        check_eval_split(self.tc, self.task)
        self.info = None

    @property
    def regression(self) -> bool:
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

    def build_student(
        self, teacher: Any, *, device: torch.device | str | None = None
    ) -> tuple[torch.nn.Module, dict[str, Any]]:
        """(a) the teacher's layers and head (:func:`pretrain.student.build_student`), or (b) ``task.student`` with
        the teacher's head or a new one. Label names go into the student's config for the export. ``device`` is
        accepted for the recipes' common signature and unused: task mode refuses ``student.init="prune"``, the only
        init that runs the teacher while building."""
        from pretrain.student import build_student, teacher_layer_map

        student: Any
        if not self.tc.student:
            student, record = build_student(teacher, self.cfg.student)
        else:
            student, record = pretrained_student(self.tc, teacher)
            record["layer_map"] = teacher_layer_map(self.cfg.student.layers, teacher.config)
        labels = list(self.task.label_names) if not self.regression else ["score"]
        student.config.id2label = dict(enumerate(labels))
        student.config.label2id = {n: i for i, n in enumerate(labels)}
        if self.regression:
            student.config.problem_type = "regression"
        return student, record

    def build_model(
        self, student: PreTrainedModel, teacher: PreTrainedModel, record: dict, loss_cfg: Any
    ) -> TaskDistillationModel:
        """The module DeepSpeed wraps: :class:`TaskDistillationModel` (kept: its teacher computes the precomputed
        logits, on the device and in the dtype the trainer gave it)."""
        self.model = TaskDistillationModel(student, teacher, loss_cfg, record["layer_map"], regression=self.regression)
        # the FLOP count (pretrain.flops.teacher_runs): no teacher forward in a step when its logits are precomputed
        self.model.precomputed_teacher_logits = self.tc.teacher_logits == "precompute"
        return self.model

    def head_rows_key(self) -> str:
        """The rows the classification heads run on (for the FLOP count): ``n_masked``, here the sequences."""
        return "n_masked"

    # -- data --------------------------------------------------------------------------------------------------
    def _examples(self, split: str) -> Examples:
        segment_ids = uses_segment_ids(self.teacher_config)
        return encode(self.tokenizer, self.task.splits[split], self.tc.max_length, segment_ids)

    def train_loader(self, plan: Any, *, world_size: int, rank: int, pin_memory: bool) -> BatchLoader:
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
            collate_fn=lambda idx: collate(self.train, idx, pad, multiple=multiple, regression=regression),
        )

    def inputs(
        self, batch: dict[str, torch.Tensor], device: torch.device, *, step: int, rank: int, micro_step: int
    ) -> tuple:
        """(input_ids, attention_mask, labels, token_type_ids, teacher_logits) on the device (no masking)."""

        def get(k: str) -> torch.Tensor | None:
            return None if k not in batch else batch[k].to(device, non_blocking=True)

        return (get("input_ids"), get("attention_mask"), get("labels"), get("token_type_ids"), get("teacher_logits"))

    def _teacher_logits_cache(self) -> np.ndarray:
        """The teacher's logits for every train example (:func:`teacher_logits_cache` under ``RUN/``)."""
        from pretrain.rundir import RunDir

        if self.model is None:  # the trainer builds the model before the loader
            raise RuntimeError("TaskRecipe: the teacher-logit cache needs build_model first")
        teacher = self.model.teacher
        path = RunDir(self.cfg.train.output_dir).root / "teacher_logits.pt"
        return teacher_logits_cache(path, self.teacher_path, self.train, teacher, self.tokenizer.pad_token_id)

    def validator(
        self, model: Any, plan: Any, *, world_size: int, rank: int, device: torch.device, all_reduce: Any
    ) -> TaskValidator | None:
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


# ------------------------------------------------------------------------------------------- precomputed logits
def teacher_logits_cache(path: Path, teacher_path: str, train: Examples, teacher: Any, pad_id: int) -> np.ndarray:
    """The teacher's logits for every train example [n, C] float32, from ``path`` (``RUN/teacher_logits.pt``) when
    its key (teacher weights + tokenized examples + the teacher's dtype) matches, else computed by ``teacher`` (the
    trainer's, on its device and in its dtype) and saved (rank 0; other ranks wait).

    Raises:
        RuntimeError: the file left by rank 0 does not match this run's key.
    """
    import torch.distributed as dist

    from data_prep.files import atomic_path, sha256_file
    from pretrain.runtime import console, on_rank0

    weights = sorted(Path(teacher_path).glob("*.safetensors")) + sorted(Path(teacher_path).glob("*.bin"))
    key = hashlib.sha256(
        json.dumps(
            {
                "teacher": [sha256_file(w) for w in weights] or teacher_path,
                "examples": train.digest(),
                "dtype": str(teacher.dtype),
            }
        ).encode()
    ).hexdigest()

    def compute() -> None:
        if path.is_file() and torch.load(path, weights_only=True)["key"] == key:
            console(f"[pretrain] teacher logits: reusing {path} (key matches)")
            return
        logits = run_teacher(teacher, train, pad_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"key": key, "logits": torch.from_numpy(logits)}, tmp)
        console(f"[pretrain] teacher logits: computed for {len(train)} examples -> {path}")

    on_rank0(compute, rank=dist.get_rank() if dist.is_initialized() else 0)
    saved = torch.load(path, weights_only=True)
    if saved["key"] != key:
        raise RuntimeError(f"{path}: the teacher-logit cache does not match this run's teacher and examples")
    return saved["logits"].numpy()


def run_teacher(teacher: Any, data: Examples, pad_id: int, batch_size: int = 64) -> np.ndarray:
    """The teacher's logits [n, C] float32 for ``data`` (length-sorted batches padded to a multiple of 8, the one
    prediction loop), on its device and in its dtype (fp32 on CPU, half precision on GPU)."""
    device = next(teacher.parameters()).device
    return run_batches(
        teacher, data, sorted_batches(data.lengths, batch_size), pad_id=pad_id, device=device, multiple=8
    )
