"""The DeepSpeed engine and the optimizer step: building the engine, one step over the micro-batches, the ranks'
agreement at the accumulation boundary, skipping a non-finite step, and the divergence guard.
:class:`pretrain.trainer.Trainer` composes these (loading a checkpoint into the engine: :mod:`pretrain.resume`).

Host syncs: one per step, a 2-element all-reduce (MAX) at the accumulation boundary that agrees on (a) stopping, when
any rank got SIGTERM / SIGUSR1 (:class:`pretrain.runtime.StopFlag` only sets a flag), and (b) a non-finite loss
(:meth:`StepRunner.run`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from pretrain.runtime import RunError, StopFlag

MicroBatch = dict[str, torch.Tensor]
# called with each micro-batch's loss parts (device tensors), e.g. by a benchmark
OnMicroBatch = Callable[[dict[str, torch.Tensor]], None] | None


class TrainingError(RunError):
    """Training cannot go on (diverged: too many consecutive non-finite steps); written checkpoints are intact."""


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


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], *, world_size: int, stage: int) -> tuple[Any, Any]:
    """``deepspeed.initialize`` on ``model``'s trainable parameters with ``ds_config`` (the dict of
    :func:`pretrain.ds_config.build`); returns (engine, lr scheduler or None). With one rank and ZeRO-0 the engine's
    gradient all-reduce is off: it would only flatten, all-reduce and copy back every gradient."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    if world_size == 1 and stage == 0:
        engine.enable_backward_allreduce = False  # one rank: skip the flatten / all-reduce / copy-back
    return engine, scheduler


class StepRunner:
    """One optimizer step through a DeepSpeed engine (collective: every rank runs it with its own micro-batches).

    Args:
        engine: the DeepSpeed engine around ``model`` (:func:`build_engine`); model: the module it wraps.
        precision: "fp32", "fp16" or "bf16" (:func:`pretrain.ds_config.precision`); stage: the ZeRO stage.
        device: where the losses live; stop: this rank's stop flag (its request is agreed on at each step).

    For fp32 without ZeRO (``own_grad_norm``) DeepSpeed steps a plain torch optimizer, checks nothing and does not
    report the gradient norm: the norm is computed here and a non-finite step is skipped here.
    """

    def __init__(
        self, engine: Any, model: torch.nn.Module, *, precision: str, stage: int, device: torch.device, stop: StopFlag
    ):
        self.engine, self.model, self.precision, self.device, self.stop = engine, model, precision, device, stop
        self.own_grad_norm = stage == 0 and precision == "fp32"
        self._grad_norm: torch.Tensor | None = None

    def run(
        self,
        micro_batches: list[MicroBatch],
        inputs: Callable[[MicroBatch, int], tuple],
        on_micro_batch: OnMicroBatch = None,
    ) -> StepResult:
        """One optimizer step over ``micro_batches``.

        ``inputs(batch, m)`` gives micro-batch ``m``'s module arguments; each runs forward and backward, DeepSpeed
        averages gradients over micro-batches and ranks and steps the optimizer at the last one. Before that step
        the ranks agree (one all-reduce) on stopping and on non-finite values; a non-finite step is skipped
        (DeepSpeed's overflow handling, or :meth:`_skip_optimizer_step`). ``on_micro_batch`` is called with each
        micro-batch's loss parts (device tensors), e.g. by a benchmark.
        """
        engine, n = self.engine, len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        stop = nonfinite = False
        lr = float(engine.get_lr()[0]) if engine.get_lr() else 0.0
        for m, batch in enumerate(micro_batches):
            loss, parts = engine(*inputs(batch, m))
            engine.backward(loss)
            if on_micro_batch is not None:
                on_micro_batch(parts)
            for k, v in parts.items():
                v = v.detach().float()
                sums[k] = v if k not in sums else sums[k] + v
            if m == n - 1:
                stop, nonfinite = self._agree(sums["loss"])
            if m == n - 1 and nonfinite and self.own_grad_norm:
                self._skip_optimizer_step()
            else:
                engine.step()
        applied = bool(engine.was_step_applied()) and not (nonfinite and self.own_grad_norm)  # see _skip_...
        return StepResult(sums, n, lr, stop, nonfinite, applied)

    def _agree(self, loss_sum: torch.Tensor) -> tuple[bool, bool]:
        """All-reduce (MAX) of [stop requested, non-finite] at the accumulation boundary (the step's one host sync).
        For fp32 without ZeRO the gradient norm is computed here (DeepSpeed does not report it)."""
        import torch.distributed as dist

        bad = ~torch.isfinite(loss_sum)
        if self.own_grad_norm:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
            bad = bad | ~torch.isfinite(self._grad_norm)
        flags = torch.stack([torch.tensor(float(self.stop.requested), device=self.device), bad.float()])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
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

    def grad_norm(self) -> float | None:
        """The last step's global gradient norm (None when unknown or not finite)."""
        value = self._grad_norm if self.own_grad_norm else self.engine.get_global_grad_norm()
        if value is None:
            return None
        norm = float(value)
        return norm if math.isfinite(norm) else None

    def loss_scale(self) -> float:
        """fp16's current loss scale; 1.0 in other precisions."""
        if self.precision != "fp16":
            return 1.0
        opt = self.engine.optimizer
        return float(getattr(opt, "cur_scale", 0) or getattr(opt, "loss_scale", 1.0))  # cur_scale unset or None: 0
