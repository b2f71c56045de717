"""The training loop: composes the parts and runs the steps (in the manner of torchtitan's Trainer).

One :class:`Trainer` per process (one process per rank). ``setup()`` composes:

- :mod:`pretrain.runtime`: environment, distributed init, seeding, the stop flag, errors that end every rank;
- :mod:`pretrain.teacher`: preflight checks before any weights load, the frozen teacher and its dtype;
- :mod:`pretrain.rundir` + :mod:`pretrain.checkpoint`: the run directory (its lock, identity rule, layout), saving,
  finding the resume point, exports;
- the student (:mod:`pretrain.student`) and :class:`pretrain.distill.DistillationModel` in a DeepSpeed engine;
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

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from pretrain import ds_config as dsc
from pretrain import reshard
from pretrain.checkpoint import CheckpointManager, tag_for
from pretrain.config import RunConfig
from pretrain.data import BatchLoader
from pretrain.metrics import IntervalMetrics, MetricsLogger, console_line, valid_line
from pretrain.recipes import make_recipe
from pretrain.rundir import RunDir, RunLocked, write_config
from pretrain.runtime import (
    RunError,
    StopFlag,
    check_torch,
    console,
    init_distributed,
    on_rank0,
    rank_seed,
    seed_everything,
)
from pretrain.schema import ConfigError
from pretrain.stages import Stages
from pretrain.teacher import teacher_dtype


class TrainingError(RunError):
    """Training cannot go on (diverged: too many consecutive non-finite steps). Checkpoints already written are intact."""


@dataclasses.dataclass
class StepResult:
    """One optimizer step: ``parts`` sums over the micro-batches (device tensors: "loss", "loss_<term>",
    "n_masked", "n_tokens"), the micro-batch count, the learning rate used, and the ranks' agreement: ``stop``
    (a rank got a stop signal) and ``nonfinite`` (a rank saw a non-finite loss / gradient); ``applied`` is False
    when the optimizer skipped the step (non-finite values, fp16 overflow)."""

    parts: dict[str, torch.Tensor]
    micro_steps: int
    lr: float
    stop: bool
    nonfinite: bool
    applied: bool

    @property
    def bad(self) -> bool:
        return self.nonfinite or not self.applied


class DivergenceGuard:
    """Stops a run that diverged: a non-finite step the optimizer applied, or ``max_bad_steps`` consecutive skipped
    steps (non-finite loss or gradient, fp16 overflow). Raises :class:`TrainingError` naming the intact checkpoint."""

    def __init__(self, max_bad_steps: int, precision: str, stage: int):
        self.max_bad_steps, self.precision, self.stage = max_bad_steps, precision, stage
        self.bad_steps = 0

    def check(self, res: StepResult, step: int, *, last_saved: int | None) -> None:
        """Count ``res`` (the result of optimizer step ``step``); raise when the run must stop."""
        if res.nonfinite and res.applied:
            raise TrainingError(
                f"step {step}: a non-finite loss was applied by the optimizer ({self.precision}, ZeRO-{self.stage}); "
                f"stopping without saving. The last checkpoint ({last_saved}) is intact; lower the learning rate or "
                f"check the data"
            )
        self.bad_steps = self.bad_steps + 1 if res.bad else 0
        if self.bad_steps >= self.max_bad_steps:
            raise TrainingError(
                f"step {step}: {self.bad_steps} consecutive steps with a non-finite loss or gradient "
                f"(train.max_bad_steps={self.max_bad_steps}; skipped, weights unchanged); stopping. Checkpoints "
                f"up to step {last_saved} are intact. Lower the learning rate, use bf16 instead of fp16, "
                f"or check the data"
            )


class Trainer:
    """One rank of a distillation run (see the module docstring).

    Usage: ``t = Trainer(cfg); t.setup(); t.fit(); t.close()``. Attributes after ``setup()``: ``engine`` (the
    DeepSpeed engine around ``model``, the recipe's module), ``recipe`` (:mod:`pretrain.recipes`), ``loader``, ``plan``
    (batch arithmetic), ``step`` (optimizer steps done), ``rank``, ``world_size``, ``device``, ``run`` (the run
    directory), ``ckpt`` (its checkpoints), ``metrics`` (the interval sums).
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.stop = StopFlag()
        self.step = 0
        self.run = RunDir(cfg.train.output_dir)
        self.stages = Stages(cfg)
        self.logger: MetricsLogger | None = None
        self.loader: BatchLoader | None = None
        self.lock = None
        self._grad_norm: torch.Tensor | None = None

    # -- set-up ------------------------------------------------------------------------------------------------

    def setup(self) -> Trainer:
        """Compose the parts (see the module docstring); resumes from the newest complete checkpoint."""
        check_torch()
        self.stop.install()
        self.rank, self.world_size, self.device = init_distributed()
        import torch.distributed as dist

        self.dist, self.cuda, self.is_main = dist, self.device.type == "cuda", self.rank == 0
        self.ds_config = dsc.build(
            self.cfg.deepspeed, max_steps=self.cfg.train.max_steps, world_size=self.world_size, cuda=self.cuda
        )
        self.plan = dsc.BatchPlan(*(self.ds_config[k] for k in dsc.BATCH_KEYS))
        self.precision, self.stage = dsc.precision(self.ds_config), dsc.zero_stage(self.ds_config)
        self.recipe = make_recipe(self.cfg)
        self.recipe.preflight(self.world_size)
        self.tokenizer = self.recipe.tokenizer
        on_rank0(self._take_lock, rank=self.rank, expected=(ConfigError,))
        self.ckpt = CheckpointManager(
            self.run,
            rank=self.rank,
            world_size=self.world_size,
            keep_last=self.cfg.train.keep_last,
            save_interval=self.cfg.train.save_interval,
            all_ok=self._all_ok,
        )
        resume = on_rank0(
            lambda: self.ckpt.resume_point(
                self.cfg.to_dict(), allow_world_size_change=self.cfg.train.allow_world_size_change
            ),
            rank=self.rank,
            expected=(ConfigError,),
        )
        self._universal = resume is not None and reshard.needs_universal(
            self.stage, resume[1]["world_size"], self.world_size
        )
        if self._universal:  # ZeRO-1/2/3 on another world size: load through DeepSpeed's universal checkpoint
            self.ds_config = reshard.with_universal_load(self.ds_config)
        self._build_model(fresh=resume is None)
        self._build_engine()
        self.guard = DivergenceGuard(self.cfg.train.max_bad_steps, self.precision, self.stage)
        self._build_data()
        seed_everything(rank_seed(self.cfg.train.seed, self.rank))  # dropout differs per rank
        if resume is not None:
            self._load(*resume)
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

    def _all_ok(self, ok: bool) -> bool:
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def _build_model(self, fresh: bool) -> None:
        """Teacher, student (identical on every rank: seeded alike) and the module DeepSpeed wraps (the recipe's);
        ``student_init/`` on a fresh run."""
        seed_everything(self.cfg.train.seed)
        teacher = self.recipe.load_teacher()
        from pretrain.prune import calibration_for  # student.init="prune": the seeded sample of the train shards

        with calibration_for(self.cfg, device=self.device):
            student, self.student_record = self.recipe.build_student(teacher)
        self.model = self.recipe.build_model(student, teacher, self.student_record, self.stages.loss_union())
        self.model.move_teacher(self.device, teacher_dtype(self.cfg, self.cuda))
        if self.cfg.train.compile:
            self.model.compile_parts()
        self.recipe.prepare_export(self.is_main)
        if fresh and self.cfg.train.export_init and self.is_main:
            record = {k: v for k, v in self.student_record.items() if k != "copied"}
            if self.ckpt.export_init(
                student, self._write_hf_meta, {"step": 0, "teacher": self.cfg.teacher.name_or_path, "student": record}
            ):
                console(f"[pretrain] exported the initial student to {self.run.student_init}")

    def _build_engine(self) -> None:
        import deepspeed

        self._own_grad_norm = self.stage == 0 and self.precision == "fp32"
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=params, config=self.ds_config
        )
        if self.world_size == 1 and self.stage == 0:
            self.engine.enable_backward_allreduce = False  # one rank: skip the flatten / all-reduce / copy-back

    def _build_data(self) -> None:
        from pretrain.flops import peak_flops, split_flops

        self.loader = self.recipe.train_loader(
            self.plan, world_size=self.world_size, rank=self.rank, pin_memory=self.cuda
        )
        self.validator = self.recipe.validator(
            self.model,
            self.plan,
            world_size=self.world_size,
            rank=self.rank,
            device=self.device,
            all_reduce=self.dist.all_reduce,
        )
        per_batch, per_row = split_flops(self.model)
        peak, self.peak_source = peak_flops(self.device, self.precision)
        self.metrics = IntervalMetrics(
            device=self.device,
            all_reduce=self.dist.all_reduce,
            world_size=self.world_size,
            log_interval=self.cfg.train.log_interval,
            peak_flops=peak,
            flops_per_batch=per_batch,
            flops_per_head_row=per_row,
            head_rows_key=self.recipe.head_rows_key(),
        )

    def _write_hf_meta(self, folder) -> None:
        self.recipe.write_meta(folder, self.model.student)

    def _load(self, tag: str, manifest: dict) -> None:
        """Load engine state, client state (step, cursor, counters) and this rank's RNG states from ``tag``."""
        same_world = manifest["world_size"] == self.world_size
        root = self.ckpt.root
        if self._universal:  # weights and AdamW moments re-sharded for this world size (pretrain/reshard.py)
            uroot, utag = on_rank0(lambda: reshard.to_universal(root, tag), rank=self.rank)
            load_path, client = self.engine.load_checkpoint(str(uroot), tag=utag)
            reshard.restore_frozen(self.engine, uroot, utag)  # collective under ZeRO-3
            self.dist.barrier()
            if self.is_main:
                reshard.discard(root)
                console(
                    f"[pretrain] world size {manifest['world_size']} -> {self.world_size} with ZeRO-{self.stage}: "
                    f"weights, AdamW moments, step and schedule resumed (universal checkpoint)"
                )
        else:  # the same world size, or ZeRO-0 (its optimizer state is saved whole)
            load_path, client = self.engine.load_checkpoint(str(root), tag=tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.ckpt.root / tag}")
        self.step = int(client["step"])
        self.metrics.load_state_dict(client)
        self.ckpt.last_saved = self.step
        self.loader.load_state_dict(client["data"], allow_layout_change=self.cfg.train.allow_world_size_change)
        if not (same_world and self.ckpt.load_rng(tag)):
            seed_everything(rank_seed(self.cfg.train.seed, self.rank, self.step))

    def _start_logs(self, resumed: bool) -> None:
        if self.is_main:
            changed = write_config(self.run, self.cfg.to_dict())
            if resumed and changed:
                console(f"[pretrain] config changed since the last run: {changed}; config.json updated")
        tc = self.cfg.train
        self.logger = MetricsLogger(
            self.run.metrics_file,
            self.run.tensorboard if tc.tensorboard else None,
            enabled=self.is_main,
            resume_step=self.step,
        )
        if self.is_main:
            n_s = sum(p.numel() for p in self.model.student.parameters())
            n_t = sum(p.numel() for p in self.model.teacher.parameters())
            console(
                f"[pretrain] {self.world_size} rank(s) on {self.device.type}, {self.precision}, ZeRO-{self.stage}; "
                f"{self.plan.train_batch_size} sequences/step = micro {self.plan.micro_batch} x accumulation "
                f"{self.plan.accumulation} x {self.world_size} ranks; teacher {n_t / 1e6:.1f}M -> student "
                f"{n_s / 1e6:.1f}M parameters (layers {self.student_record['layer_map']}); "
                + (
                    f"resumed from {self.ckpt.root / tag_for(self.step)} (step {self.step}, "
                    f"{self.metrics.tokens_seen:,} tokens seen)"
                    if resumed
                    else "fresh run"
                )
                + f"; run dir {self.run.root}"
            )
        self.metrics.restart_clock()

    # -- the step ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's client state: step, data cursor, tokens seen, the resolved config."""
        return {
            "step": self.step,
            "data": self.loader.state_dict(),
            "tokens_seen": self.metrics.tokens_seen,
            "masked_tokens_seen": self.metrics.masked_tokens_seen,
            "world_size": self.world_size,
            "config": self.cfg.to_dict(),
        }

    def next_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """The next step's ``gradient_accumulation_steps`` micro-batches from the loader (CPU tensors)."""
        return [next(self.loader) for _ in range(self.plan.accumulation)]

    def train_step(
        self,
        micro_batches: list[dict[str, torch.Tensor]],
        on_micro_batch: Callable[[dict[str, torch.Tensor]], None] | None = None,
    ) -> StepResult:
        """One optimizer step (collective: every rank calls it with its own micro-batches).

        Each micro-batch becomes the module's inputs through the recipe (task-agnostic: ``input_ids`` /
        ``attention_mask`` int64 [B, L] masked on the device, deterministic from (seed, step, rank, micro-step)), runs
        through teacher and student with the loss weights of the step's stage, and is back-propagated;
        DeepSpeed averages gradients over micro-batches and ranks and steps the optimizer at the last one. Before
        that step the ranks agree (one all-reduce) on stopping and on non-finite values; a non-finite step is
        skipped (DeepSpeed's overflow handling, or, for fp32 without ZeRO, dropped gradients). ``on_micro_batch``
        is called with each micro-batch's loss parts (device tensors), e.g. by a benchmark.
        """
        engine, n = self.engine, len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        stop = nonfinite = False
        lr = float(engine.get_lr()[0]) if engine.get_lr() else 0.0
        self.stages.apply(self.model, self.step)
        for m, batch in enumerate(micro_batches):
            loss, parts = engine(*self.recipe.inputs(batch, self.device, step=self.step, rank=self.rank, micro_step=m))
            engine.backward(loss)
            if on_micro_batch is not None:
                on_micro_batch(parts)
            for k, v in parts.items():
                v = v.detach().float()
                sums[k] = v if k not in sums else sums[k] + v
            if m == n - 1:
                stop, nonfinite = self._agree(sums["loss"])
            if m == n - 1 and nonfinite and self._own_grad_norm:
                self._skip_optimizer_step()
            else:
                engine.step()
        applied = bool(engine.was_step_applied()) and not (nonfinite and self._own_grad_norm)  # see _skip_...
        return StepResult(sums, n, lr, stop, nonfinite, applied)

    def _agree(self, loss_sum: torch.Tensor) -> tuple[bool, bool]:
        """All-reduce (MAX) of [stop requested, non-finite] at the accumulation boundary (the step's one host sync).
        For fp32 without ZeRO the gradient norm is computed here (DeepSpeed does not report it)."""
        bad = ~torch.isfinite(loss_sum)
        if self._own_grad_norm:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
            bad = bad | ~torch.isfinite(self._grad_norm)
        flags = torch.stack([torch.tensor(float(self.stop.requested), device=self.device), bad.float()])
        self.dist.all_reduce(flags, op=self.dist.ReduceOp.MAX)
        stop, nonfinite = (v > 0 for v in flags.tolist())
        return stop, nonfinite

    def _skip_optimizer_step(self) -> None:
        """fp32 without ZeRO: DeepSpeed steps a plain torch optimizer and checks nothing, so skip its update here as
        DeepSpeed does on an fp16 overflow: the boundary's ``engine.step()`` runs (counters, gradients zeroed) with the
        optimizer's ``step`` disabled (weights and Adam moments unchanged) and the lr schedule is not advanced."""
        opt, sched = self.engine.optimizer, self.engine.lr_scheduler
        iteration = getattr(sched, "last_batch_iteration", None)
        opt.step = lambda *args, **kwargs: None
        try:
            self.engine.step()
        finally:
            del opt.step
        if iteration is not None:
            sched.step(iteration)

    def step_once(
        self, batches: list[dict[str, torch.Tensor]] | None = None, on_micro_batch=None
    ) -> tuple[StepResult, list[dict[str, torch.Tensor]]]:
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
            last = self.step == tc.max_steps
            save = self.ckpt.should_save(self.step, last=last, stopping=res.stop)
            if save or self.metrics.should_log(self.step):
                self.log_train()
            if save:  # before the evaluation: a stop signal leaves little time (skipped steps changed no weight)
                self.save()
            if self.should_validate(self.step):
                self.evaluate()
            if res.stop:
                if self.is_main:
                    console(
                        f"[pretrain] stopped by {self.stop.describe()} at step {self.step}: checkpoint saved; "
                        f"run the same command again to resume"
                    )
                return 0
        if self.ckpt.last_saved != self.step:
            self.save()
        self.export_final()
        return 0

    def should_validate(self, step: int) -> bool:
        """Whether to evaluate after ``step``: every ``train.eval_interval`` steps and at the last step."""
        tc = self.cfg.train
        return self.validator is not None and (
            (tc.eval_interval and step % tc.eval_interval == 0) or step == tc.max_steps
        )

    def log_train(self) -> dict[str, Any] | None:
        """Sync the interval's metrics (collective) and, on rank 0, write one train record and a console line."""
        rec = self.metrics.record(self.step, self.loader.order.epoch, self._grad_norm_value(), self._loss_scale())
        if rec is not None and self.is_main:
            self.logger.log(rec)
            console(console_line(rec, self.cfg.train.max_steps))
        return rec

    def _grad_norm_value(self) -> float | None:
        value = self._grad_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    def _loss_scale(self) -> float:
        if self.precision != "fp16":
            return 1.0
        opt = self.engine.optimizer
        return float(getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", 1.0))

    def evaluate(self) -> dict[str, float] | None:
        """Evaluate the student on the valid split (collective; :class:`pretrain.validate.Validator`); rank 0 logs a
        ``"split": "valid"`` record and returns it (None on other ranks or without evaluation)."""
        if self.validator is None:
            return None
        import time

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

    def save(self):
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

    def export_final(self):
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
        if self.loader is not None:
            self.loader.close()
        if self.logger is not None:
            self.logger.close()
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
