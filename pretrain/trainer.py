"""The training loop: composes the parts and runs the steps (in the manner of torchtitan's Trainer).

One :class:`Trainer` per process (one process per rank). ``setup()`` composes:

- :mod:`pretrain.runtime`: environment, distributed init, seeding, the stop flag, errors that end every rank;
- :mod:`pretrain.teacher`: preflight checks before any weights load, the frozen teacher and its dtype;
- :mod:`pretrain.rundir` + :mod:`pretrain.checkpoint`: the run directory (its lock, identity rule, layout), saving,
  finding the resume point, exports;
- the student (:mod:`pretrain.student`) and :class:`pretrain.distill.DistillationModel` in a DeepSpeed engine, and
  the optimizer step through it (:mod:`pretrain.engine`: :class:`~pretrain.engine.StepRunner`, the divergence guard);
- :mod:`pretrain.data` (data order, loader), :mod:`pretrain.masking`;
- :mod:`pretrain.metrics` (device-side sums, one sync per log interval, JSONL + TensorBoard, MFU) and
  :mod:`pretrain.validate` (the held-out metrics).

``fit()`` runs the steps; ``train_step()`` is one optimizer step over ``gradient_accumulation_steps`` micro-batches;
``step_once()`` is one step of ``fit`` without the logging, evaluation and checkpoints (for benchmarks).

Host syncs: one per step, a 2-element all-reduce (MAX) at the accumulation boundary that agrees on (a) stopping, when
any rank got SIGTERM / SIGUSR1 (the handler only sets a flag), and (b) a non-finite loss. Losses and token counts stay
device tensors and are all-reduced once per ``log_interval``. On a stop signal the ranks save a checkpoint together
first, then evaluate if one was due, and exit 0; running the same command again resumes (docs/cluster.md).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pretrain import ds_config as dsc
from pretrain import reshard
from pretrain.checkpoint import CheckpointManager, tag_for
from pretrain.config import RunConfig
from pretrain.data import BatchLoader
from pretrain.engine import (
    DivergenceGuard,
    MicroBatch,
    OnMicroBatch,
    StepResult,
    StepRunner,
    TrainingError,
    build_engine,
)
from pretrain.metrics import IntervalMetrics, MetricsLogger, console_line, start_line, valid_line
from pretrain.recipes import make_recipe
from pretrain.resume import ResumePoint
from pretrain.rundir import RunDir, RunLock, RunLocked, record_start, write_config
from pretrain.runtime import (
    StopFlag,
    all_ranks_ok,
    check_torch,
    console,
    environment,
    init_distributed,
    on_rank0,
    rank_seed,
    seed_everything,
)
from pretrain.schema import ConfigError
from pretrain.stages import Stages
from pretrain.teacher import teacher_dtype
from pretrain.validate import evaluation_due

__all__ = ["StepResult", "Trainer", "TrainingError", "run"]  # StepResult, TrainingError: pretrain.engine's


class Trainer:
    """One rank of a distillation run (see the module docstring).

    Usage: ``t = Trainer(cfg); t.setup(); t.fit(); t.close()``. Attributes after ``setup()``: ``engine`` (the
    DeepSpeed engine around ``model``, the recipe's module), ``stepper`` (its optimizer step), ``recipe``
    (:mod:`pretrain.recipes`), ``loader``, ``plan`` (batch arithmetic), ``step`` (optimizer steps done), ``rank``,
    ``world_size``, ``device``, ``run`` (the run directory), ``ckpt`` (its checkpoints), ``metrics`` (the interval
    sums).
    """

    # set by setup(); close() copes with a set-up that stopped part-way
    loader: BatchLoader
    logger: MetricsLogger

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.stop = StopFlag()
        self.step = 0
        self.run = RunDir(cfg.train.output_dir)
        self.stages = Stages(cfg.train, cfg.loss)
        self.lock: RunLock | None = None

    # -- set-up ------------------------------------------------------------------------------------------------

    def setup(self) -> Trainer:
        """Compose the parts (see the module docstring); resumes from the newest complete checkpoint."""
        check_torch()
        self.stop.install()
        self.rank, self.world_size, self.device = init_distributed()
        self.cuda, self.is_main = self.device.type == "cuda", self.rank == 0
        tc = self.cfg.train
        self.ds_config, self.plan, self.precision, self.stage = dsc.resolve(
            self.cfg.deepspeed, max_steps=tc.max_steps, world_size=self.world_size, cuda=self.cuda
        )
        self.recipe = make_recipe(self.cfg)
        self.recipe.preflight(self.world_size)
        self.tokenizer = self.recipe.tokenizer
        on_rank0(self._take_lock, rank=self.rank, expected=(ConfigError,))
        self.ckpt = CheckpointManager(
            self.run,
            rank=self.rank,
            world_size=self.world_size,
            keep_last=tc.keep_last,
            save_interval=tc.save_interval,
            all_ok=functools.partial(all_ranks_ok, device=self.device),
        )
        resume = ResumePoint.find(
            self.ckpt, self.cfg.to_dict(), allow_world_size_change=tc.allow_world_size_change, stage=self.stage
        )
        if resume is not None and resume.universal:  # ZeRO-1/2/3 on another world size: DeepSpeed's universal load
            self.ds_config = reshard.with_universal_load(self.ds_config)
        self._build_model(fresh=resume is None)
        self.engine, self.scheduler = build_engine(
            self.model, self.ds_config, world_size=self.world_size, stage=self.stage
        )
        self.stepper = StepRunner(
            self.engine, self.model, precision=self.precision, stage=self.stage, device=self.device, stop=self.stop
        )
        self.guard = DivergenceGuard(tc.max_bad_steps, self.precision, self.stage)
        self._build_data()
        seed_everything(rank_seed(tc.seed, self.rank))  # dropout differs per rank
        if resume is not None:
            self._load(resume)
        elif self.scheduler is not None and getattr(self.scheduler, "last_batch_iteration", 0) == -1:
            self.scheduler.step()  # DeepSpeed's Warmup* start at iteration -1: step k then uses the lr of k-1
        self._start_logs(resumed=resume is not None)
        return self

    def _take_lock(self) -> None:
        """Rank 0 holds the run directory's lock for the life of the run (another live run there is refused)."""
        self.run.root.mkdir(parents=True, exist_ok=True)
        try:
            self.lock = self.run.lock()
        except RunLocked as e:
            raise ConfigError(f"train.output_dir: {e}") from None

    def _build_model(self, fresh: bool) -> None:
        """Teacher, student (identical on every rank: seeded alike) and the module DeepSpeed wraps (the recipe's);
        ``student_init/`` on a fresh run."""
        seed_everything(self.cfg.train.seed)
        teacher = self.recipe.load_teacher()
        # student.init="prune": the recipe draws the calibration sample and scores the teacher on this device
        student, self.student_record = self.recipe.build_student(teacher, device=self.device)
        self.model = self.recipe.build_model(student, teacher, self.student_record, self.stages.loss_union())
        self.model.move_teacher(self.device, teacher_dtype(self.cfg.teacher, self.cfg.deepspeed, self.cuda))
        if self.cfg.train.compile:
            self.model.compile_parts()
        self.recipe.prepare_export(self.is_main)
        if fresh and self.cfg.train.export_init and self.is_main:
            record = {k: v for k, v in self.student_record.items() if k != "copied"}
            if self.ckpt.export_init(
                student, self._write_hf_meta, {"step": 0, "teacher": self.cfg.teacher.name_or_path, "student": record}
            ):
                console(f"[pretrain] exported the initial student to {self.run.student_init}")

    def _build_data(self) -> None:
        """The train loader, the validator (None without evaluation) and the interval metrics."""
        self.loader = self.recipe.train_loader(
            self.plan, world_size=self.world_size, rank=self.rank, pin_memory=self.cuda
        )
        self.validator = self.recipe.validator(
            self.model,
            self.plan,
            world_size=self.world_size,
            rank=self.rank,
            device=self.device,
            all_reduce=dist.all_reduce,
        )
        self.metrics, self.peak_source = IntervalMetrics.for_model(
            self.model,
            device=self.device,
            precision=self.precision,
            all_reduce=dist.all_reduce,
            world_size=self.world_size,
            log_interval=self.cfg.train.log_interval,
            head_rows_key=self.recipe.head_rows_key(),
        )

    def _write_hf_meta(self, folder: Path) -> None:
        self.recipe.write_meta(folder, self.model.student)

    def _load(self, resume: ResumePoint) -> None:
        """Load engine state, client state (step, cursor, counters) and this rank's RNG states from ``resume``."""
        client = resume.load_engine(self.engine, self.ckpt, stage=self.stage)
        self.step = int(client["step"])
        self.metrics.load_state_dict(client)
        self.ckpt.last_saved = self.step
        self.loader.load_state_dict(client["data"], allow_layout_change=self.cfg.train.allow_world_size_change)
        if not (resume.manifest["world_size"] == self.world_size and self.ckpt.load_rng(resume.tag)):
            seed_everything(rank_seed(self.cfg.train.seed, self.rank, self.step))

    def _start_logs(self, resumed: bool) -> None:
        """config.json, the metrics logger (rank 0 writes) and the start line."""
        if self.is_main:
            changed = write_config(self.run, self.cfg.to_dict())
            if resumed and changed:
                console(f"[pretrain] config changed since the last run: {changed}; config.json updated")
            start = {**environment(), "world_size": self.world_size, "step": self.step, "time": time.time()}
            record_start(self.run, start)
        self.logger = MetricsLogger(
            self.run.metrics_file,
            self.run.tensorboard if self.cfg.train.tensorboard else None,
            enabled=self.is_main,
            resume_step=self.step,
        )
        if self.is_main:
            console(
                start_line(
                    world_size=self.world_size,
                    device=self.device.type,
                    precision=self.precision,
                    stage=self.stage,
                    plan=self.plan,
                    model=self.model,
                    layer_map=self.student_record["layer_map"],
                    resumed_from=self.ckpt.root / tag_for(self.step) if resumed else None,
                    step=self.step,
                    tokens_seen=self.metrics.tokens_seen,
                    run_dir=self.run.root,
                )
            )
        self.metrics.restart_clock()

    # -- the step ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's client state: step, data cursor, tokens seen, the resolved config."""
        return {
            "step": self.step,
            "data": self.loader.state_dict(),
            **self.metrics.state_dict(),  # tokens_seen, masked_tokens_seen
            "world_size": self.world_size,
            "config": self.cfg.to_dict(),
        }

    def next_micro_batches(self) -> list[MicroBatch]:
        """The next step's ``gradient_accumulation_steps`` micro-batches from the loader (CPU tensors)."""
        return [next(self.loader) for _ in range(self.plan.accumulation)]

    def train_step(self, micro_batches: list[MicroBatch], on_micro_batch: OnMicroBatch = None) -> StepResult:
        """One optimizer step (collective: every rank calls it with its own micro-batches), with the loss weights of
        the step's stage (:class:`pretrain.stages.Stages`), through :meth:`pretrain.engine.StepRunner.run`.

        Each micro-batch becomes the module's inputs through the recipe (task-agnostic: ``input_ids`` /
        ``attention_mask`` int64 [B, L] masked on the device, deterministic from (seed, step, rank, micro-step)).
        ``on_micro_batch`` is called with each micro-batch's loss parts (device tensors), e.g. by a benchmark.
        """
        self.stages.apply(self.model, self.step)
        step, rank, device = self.step, self.rank, self.device

        def inputs(batch: MicroBatch, m: int) -> tuple:
            return self.recipe.inputs(batch, device, step=step, rank=rank, micro_step=m)

        return self.stepper.run(micro_batches, inputs, on_micro_batch)

    def step_once(
        self, batches: list[MicroBatch] | None = None, on_micro_batch: OnMicroBatch = None
    ) -> tuple[StepResult, list[MicroBatch]]:
        """One step as :meth:`fit` runs it (``batches``, default the next micro-batches; :meth:`train_step`; the step
        counter), without logging, evaluation or checkpoints; returns (result, micro-batches). For benchmarks."""
        batches = self.next_micro_batches() if batches is None else batches
        res = self.train_step(batches, on_micro_batch)
        self.step += 1
        return res, batches

    # -- the loop ----------------------------------------------------------------------------------------------

    def fit(self) -> int:
        """Train to ``train.max_steps`` (or a stop signal); returns the process exit code (0).

        Raises :class:`TrainingError` after ``train.max_bad_steps`` consecutive skipped steps, or when a
        non-finite step was applied; :class:`pretrain.checkpoint.CheckpointError` when a checkpoint cannot be
        written. Checkpoints already written stay intact.
        """
        tc = self.cfg.train
        self.metrics.restart_clock()
        while self.step < tc.max_steps:
            res, batches = self.step_once()
            self.metrics.add(res, [tuple(b["input_ids"].shape) for b in batches])
            self.guard.check(res, self.step, last_saved=self.ckpt.last_saved)
            save = self.ckpt.should_save(self.step, last=self.step == tc.max_steps, stopping=res.stop)
            if save or self.metrics.should_log(self.step):
                self.log_train()
            if save:  # before the evaluation: a stop signal leaves little time (skipped steps changed no weight)
                self.save()
            if self.validator is not None and evaluation_due(self.step, tc.eval_interval, tc.max_steps):
                self.evaluate()
            if res.stop:
                if self.is_main:
                    console(self.stop.stopped_line(self.step))
                return 0
        if self.ckpt.last_saved != self.step:
            self.save()
        self.export_final()
        return 0

    def log_train(self) -> dict[str, Any] | None:
        """Sync the interval's metrics (collective) and, on rank 0, write one train record and a console line."""
        rec = self.metrics.record(
            self.step, self.loader.order.epoch, self.stepper.grad_norm(), self.stepper.loss_scale()
        )
        if rec is not None and self.is_main:
            self.logger.log(rec)
            console(console_line(rec, self.cfg.train.max_steps))
        return rec

    def evaluate(self) -> dict[str, float] | None:
        """Evaluate the student on the valid split (collective; :class:`pretrain.validate.Validator`); rank 0 logs a
        ``"split": "valid"`` record and returns it (None on other ranks or without evaluation)."""
        if self.validator is None:
            return None
        self.engine.eval()
        try:
            rec = self.validator.run(self.step)
        finally:
            self.engine.train()
        self.metrics.restart_clock()
        if not self.is_main:
            return None
        rec["time"] = time.time()
        self.logger.log(rec)
        console(valid_line(rec))
        return rec

    # -- checkpoints and export --------------------------------------------------------------------------------

    def save(self) -> Path:
        """Save a checkpoint of the current step (collective). Returns the tag directory."""
        from pretrain.export import HF_DIR

        if self.metrics.pending():
            self.log_train()
        tag_dir = self.ckpt.save(
            self.engine, self.step, self.state_dict(), write_extra=lambda d: self._write_hf_meta(d / HF_DIR)
        )
        if self.is_main:
            console(f"[pretrain] saved checkpoint {tag_dir}")
        self.metrics.restart_clock()
        return tag_dir

    def export_final(self) -> Path:
        """Rank 0 exports the last checkpoint to ``output_dir/student`` (ZeRO consolidated); others wait."""
        out = on_rank0(self.ckpt.export_final, rank=self.rank)
        if self.is_main:
            console(
                f"[pretrain] exported the student to {out[0]}"
                if out[1]
                else f"[pretrain] {out[0]} already holds the export of the latest checkpoint"
            )
        return out[0]

    def close(self) -> None:
        """Close the loader thread, the logs and the run directory's lock (the process group stays for the caller)."""
        for part in (getattr(self, "loader", None), getattr(self, "logger", None)):
            if part is not None:
                part.close()
        if self.lock is not None:
            self.lock.release()


def run(cfg: RunConfig) -> int:
    """Set up and train one rank; returns the exit code. Used by the entry point (``launch/pretrain.py``)."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.fit()
    finally:
        trainer.close()
