"""What a run distils and on which data: the part of a run that differs between task-agnostic and task distillation.

The trainer (:mod:`pretrain.trainer`) composes one recipe and otherwise runs the same loop, engine, checkpoints and
logs for both. A recipe: checks its inputs before any weights load (``preflight``), loads the frozen teacher, builds
the student and the module DeepSpeed wraps, makes the resumable train loader, turns a micro-batch into the module's
inputs, evaluates, and writes the Hugging Face files an export needs besides the weights.

- :class:`PretrainRecipe`: task-agnostic distillation (DistilBERT) on prepared shards: dynamic MLM masking,
  :class:`pretrain.distill.DistillationModel`, held-out MLM / representation metrics (:class:`pretrain.validate.
  Validator`).
- :class:`pretrain.taskmode.TaskRecipe`: task distillation of a fine-tuned classifier on labeled examples (the
  ``task`` config section).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pretrain.data import BatchLoader, DataOrder, eval_batches, open_split
from pretrain.masking import Masker
from pretrain.schema import ConfigError


def make_recipe(cfg):
    """The recipe of a run config: :class:`pretrain.taskmode.TaskRecipe` when ``task.name`` is set, else
    :class:`PretrainRecipe`."""
    if getattr(cfg, "task", None) is not None and cfg.task.name:
        from pretrain.tasks.recipe import TaskRecipe  # core -> tasks: this lazy import only

        return TaskRecipe(cfg)
    return PretrainRecipe(cfg)


class PretrainRecipe:
    """Task-agnostic distillation on prepared shards (see the module docstring).

    Attributes after :meth:`preflight`: ``info`` (:class:`pretrain.teacher.Preflight`), ``tokenizer``, ``valid``
    (the valid split, or None when ``train.evaluate`` is false).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.masker: Masker | None = None  # built by preflight (it needs the tokenizer and the token counts)
        self.st_files: dict = {}

    # -- before any weights ------------------------------------------------------------------------------------
    def preflight(self, world_size: int) -> None:
        """Check the teacher, the shards and the valid split (:func:`pretrain.teacher.preflight`); raises
        :class:`ConfigError` naming the key and what to do."""
        from pretrain.teacher import preflight

        self.info = preflight(self.cfg)
        self.tokenizer = self.info.tokenizer
        self.teacher_path = self.info.teacher_path
        self.valid = self._open_valid(world_size)

    def _open_valid(self, world_size: int):
        """The valid split when evaluation is configured (``train.evaluate``); refuses a missing, unreadable or too
        small one at once, saying what to do."""
        cfg = self.cfg
        if not cfg.train.evaluate:
            return None
        fix = (
            f"prepare the shards with a held-out split (python -m data_prep prepare ... --valid-fraction 0.01 "
            f"--output {cfg.data.dir}), or set train.evaluate=false to train without evaluation"
        )
        try:
            valid = open_split(cfg.data.dir, "valid")
        except ConfigError as e:
            raise ConfigError(f"{e}; {fix}") from None
        if len(valid) < world_size:
            raise ConfigError(
                f"data.dir: the valid split of {cfg.data.dir} has {len(valid)} sequence(s), fewer "
                f"than the {world_size} ranks that share it out; {fix}"
            )
        return valid

    # -- models ------------------------------------------------------------------------------------------------
    def load_teacher(self) -> torch.nn.Module:
        """The frozen teacher in fp32 (:func:`pretrain.teacher.load_teacher`)."""
        from pretrain.teacher import load_teacher

        return load_teacher(self.cfg, self.info)

    def build_student(
        self, teacher: torch.nn.Module, *, device: torch.device | str | None = None
    ) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The student and its record (:func:`pretrain.student.build_student`); parameters no loss reaches are
        frozen (:func:`pretrain.student.freeze_unused`). With ``student.init="prune"`` the calibration sample is
        drawn here (:meth:`calibration`) and passed down; its forwards run on ``device`` (default: the teacher's).
        Raises :class:`ConfigError` as those do."""
        from pretrain.student import build_student, freeze_unused

        if device is None:
            device = next(teacher.parameters()).device
        student, record = build_student(teacher, self.cfg.student, self.calibration(device))
        freeze_unused(student)
        return student, record

    def calibration(self, device: torch.device | str | None = None) -> list[dict[str, torch.Tensor]] | None:
        """The pruning importance's calibration sample when ``student.init="prune"`` (else None):
        :func:`pretrain.prune.calibration_batches` of the train split of ``data.dir``, ``student.calibration_sequences``
        sequences drawn with ``train.seed`` (the same on every rank), int64 [B, L] micro-batches on ``device`` (CPU
        by default). Raises :class:`ConfigError` (``data.dir``) for a missing or empty train split."""
        cfg = self.cfg
        if cfg.student.init != "prune":
            return None
        from pretrain.prune import calibration_batches

        return calibration_batches(
            cfg.data.dir, n=cfg.student.calibration_sequences, seed=cfg.train.seed, device=device
        )

    def build_model(self, student, teacher, record: dict, loss_cfg) -> torch.nn.Module:
        """The module DeepSpeed wraps: :class:`pretrain.distill.DistillationModel`."""
        from pretrain.distill import DistillationModel

        return DistillationModel(student, teacher, loss_cfg, record["layer_map"])

    def head_rows_key(self) -> str:
        """The count the LM heads run on per micro-batch (for the FLOP count)."""
        return "n_masked" if self.cfg.loss.restrict_ce_to_mask else "n_tokens"

    # -- data --------------------------------------------------------------------------------------------------
    def train_loader(self, plan, *, world_size: int, rank: int, pin_memory: bool) -> BatchLoader:
        """The resumable train loader over the shards (and the masker, from the train split's token counts)."""
        from data_prep.errors import DataPrepError
        from data_prep.shards import load_token_counts

        cfg = self.cfg
        try:
            token_counts = load_token_counts(cfg.data.dir)
        except DataPrepError as e:
            raise ConfigError(f"data.dir: {e}") from None
        self.masker = Masker.from_tokenizer(cfg.masking, self.tokenizer, token_counts=token_counts, seed=cfg.train.seed)
        train = open_split(cfg.data.dir, "train")
        order = DataOrder(
            len(train),
            micro_batch=plan.micro_batch,
            world_size=world_size,
            rank=rank,
            seed=cfg.train.seed,
            shuffle=cfg.data.shuffle,
        )
        return BatchLoader(
            train,
            order,
            pad_id=self.tokenizer.pad_token_id,
            multiple=cfg.data.pad_to_multiple_of,
            prefetch=cfg.data.prefetch,
            pin_memory=pin_memory,
        )

    def inputs(
        self, batch: dict[str, torch.Tensor], device: torch.device, *, step: int, rank: int, micro_step: int
    ) -> tuple:
        """The module's arguments for one micro-batch: (masked ids, attention mask, labels), masked on the device
        deterministically from (seed, step, rank, micro_step)."""
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        if self.masker is None:
            raise RuntimeError("PretrainRecipe.inputs before preflight: the masker is built there")
        masked, labels = self.masker(ids, mask, step=step, rank=rank, micro_step=micro_step)
        return masked, mask, labels

    def validator(self, model, plan, *, world_size: int, rank: int, device: torch.device, all_reduce):
        """The in-run evaluation (:class:`pretrain.validate.Validator`), or None without a valid split."""
        from pretrain.validate import Validator

        if self.valid is None:
            return None

        def batches():
            return eval_batches(
                self.valid,
                micro_batch=plan.micro_batch,
                world_size=world_size,
                rank=rank,
                max_sequences=self.cfg.train.eval_sequences,
                pad_id=self.tokenizer.pad_token_id,
                multiple=self.cfg.data.pad_to_multiple_of,
            )

        return Validator(model, batches, self.masker, device=device, all_reduce=all_reduce, rank=rank)

    # -- export ------------------------------------------------------------------------------------------------
    def prepare_export(self, is_main: bool) -> None:
        """Collect the teacher's sentence-transformers files (rank 0) for the exports."""
        from pretrain.export import sentence_transformers_files

        self.st_files = sentence_transformers_files(self.teacher_path) if is_main else {}

    def write_meta(self, folder: Path, student: torch.nn.Module) -> None:
        """Write the student's config, the tokenizer and the sentence-transformers files into ``folder``."""
        from pretrain.export import write_hf_meta

        write_hf_meta(folder, student.config, self.tokenizer, self.st_files, type(student).__name__)
