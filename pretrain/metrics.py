"""Training metrics: accumulation on the device, one sync per log interval, ``metrics.jsonl`` and TensorBoard.

:class:`IntervalMetrics` sums each step's losses and token counts as device tensors (no host sync in the step) and,
every ``train.log_interval`` steps (:meth:`IntervalMetrics.should_log`), all-reduces them in one collective and makes
one ``"split": "train"`` record: the mean of each loss term per micro-batch, learning rate, gradient norm, loss scale,
tokens/s, seconds per step, model FLOP/s and MFU (model FLOPs of teacher forward + student forward and backward, over
the device's peak: :mod:`pretrain.flops`). :class:`MetricsLogger` (rank 0) writes the records to ``metrics.jsonl`` and
TensorBoard and drops the lines an interrupted run logged after the checkpoint it resumes from.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data_prep.files import atomic_write_text

if TYPE_CHECKING:
    from pretrain.distill import DistillationModel
    from pretrain.ds_config import BatchPlan
    from pretrain.engine import StepResult


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (one JSON object per line). Blank lines and torn lines (a process killed
    mid-write, a full disk) are skipped rather than failing the reader."""
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


class MetricsLogger:
    """Rank 0's outputs: ``metrics.jsonl`` lines, TensorBoard scalars.

    At start the existing ``metrics.jsonl`` keeps only the records of steps up to ``resume_step`` (0 on a fresh run):
    lines an interrupted run logged after its last checkpoint, and torn lines, are dropped; TensorBoard purges the same
    steps (``purge_step``), so each step is logged once.

    Args:
        path: ``metrics.jsonl``; tensorboard_dir: TensorBoard folder or None; enabled: False on ranks > 0.
    """

    def __init__(self, path: Path, tensorboard_dir: Path | None, *, enabled: bool, resume_step: int):
        self.enabled, self.path, self.tb = enabled, Path(path), None
        if not enabled:
            return
        if self.path.is_file():
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep), what="metrics log")
        else:
            atomic_write_text(self.path, "", what="metrics log")
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold ``step`` and ``split``); numbers go to TensorBoard as ``split/key``."""
        if not self.enabled:
            return
        # one append per record (a few per log interval), closed at once: no handle is held between records, so a
        # killed process leaves at most one torn line (read_metrics skips it)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            split = record["split"]
            for k, v in record.items():
                if k not in ("step", "split", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        """Stop logging and close the TensorBoard writer (idempotent)."""
        self.enabled = False
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class IntervalMetrics:
    """Sums of one log interval, kept on the device; one all-reduce per interval.

    Args:
        device: where the sums live; all_reduce: ``torch.distributed.all_reduce`` (sum); world_size: ranks;
        log_interval: steps between records (``train.log_interval``); peak_flops: one rank's device peak FLOP/s
        (None: no MFU; the interval's FLOPs are summed over the ranks, so MFU divides by world_size x this);
        flops_per_batch: ``(sequences, seq_len) -> FLOPs`` of one micro-batch without the LM heads;
        flops_per_head_row: ``() -> FLOPs`` of the heads per row for the current loss terms (0 when no head runs;
        called per step: stages switch the terms); head_rows_key: ``"n_masked"`` or ``"n_tokens"`` (the rows the
        heads run on; the sequences in task distillation). :meth:`for_model` derives the FLOP counts and
        the peak from the module and the device.
    """

    def __init__(
        self,
        *,
        device: torch.device,
        all_reduce: Callable,
        world_size: int,
        log_interval: int,
        peak_flops: float | None,
        flops_per_batch: Callable[[int, int], int],
        flops_per_head_row: Callable[[], int],
        head_rows_key: str,
    ):
        self.device, self.all_reduce, self.world_size, self.log_interval = device, all_reduce, world_size, log_interval
        self.peak_flops, self.flops_per_batch = peak_flops, flops_per_batch
        self.flops_per_head_row, self.head_rows_key = flops_per_head_row, head_rows_key
        self.tokens_seen = 0
        self.masked_tokens_seen = 0
        self.loss_keys: list[str] = []
        self._reset()
        self._t0 = time.perf_counter()

    @classmethod
    def for_model(
        cls,
        model: DistillationModel,
        *,
        device: torch.device,
        precision: str,
        all_reduce: Callable,
        world_size: int,
        log_interval: int,
        head_rows_key: str,
    ) -> tuple[IntervalMetrics, str]:
        """The interval metrics of a :class:`pretrain.distill.DistillationModel` on ``device``: its FLOPs per
        micro-batch and per head row (:func:`pretrain.flops.split_flops`) and the device's peak for ``precision``
        (:func:`pretrain.flops.peak_flops`: on CPU a matmul measured now, about 0.1 s). Returns (metrics, where the
        peak comes from)."""
        from pretrain.flops import peak_flops, split_flops

        per_batch, per_row = split_flops(model)
        peak, source = peak_flops(device, precision)
        metrics = cls(
            device=device,
            all_reduce=all_reduce,
            world_size=world_size,
            log_interval=log_interval,
            peak_flops=peak,
            flops_per_batch=per_batch,
            flops_per_head_row=per_row,
            head_rows_key=head_rows_key,
        )
        return metrics, source

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.micro = self.steps = self.skipped = 0
        self.batch_flops = 0
        self.head_flops = torch.zeros((), dtype=torch.float64, device=self.device)
        self.lr = 0.0

    def should_log(self, step: int) -> bool:
        """Whether ``step`` ends a log interval."""
        return step % self.log_interval == 0

    def pending(self) -> bool:
        """Whether steps were accumulated since the last sync."""
        return self.steps > 0

    def add(self, res: StepResult, shapes: Sequence[tuple[int, ...]]) -> None:
        """Accumulate one :class:`pretrain.engine.StepResult` whose micro-batches had ``shapes`` ([(B, L)])."""
        for k in ("n_tokens", "n_masked"):
            v = res.parts[k]
            self.counts[k] = v if k not in self.counts else self.counts[k] + v
        self.steps += 1
        self.lr = res.lr
        self.batch_flops += sum(self.flops_per_batch(b, n) for b, n in shapes)
        self.head_flops = self.head_flops + res.parts[self.head_rows_key].double() * self.flops_per_head_row()
        if res.bad:
            self.skipped += 1
            return
        for k, v in res.parts.items():
            if k.startswith("loss"):
                self.sums[k] = v if k not in self.sums else self.sums[k] + v
        self.micro += res.micro_steps

    def sync(self) -> dict[str, float]:
        """All-reduce the interval's sums (one collective; every rank calls it), add the tokens seen; returns
        ``{"tokens", "masked", "flops", loss keys: mean per micro-batch}`` summed over ranks."""
        keys = sorted(self.sums)
        zero = torch.zeros((), device=self.device)
        vec = torch.stack(
            [
                self.counts.get("n_tokens", zero),
                self.counts.get("n_masked", zero),
                self.head_flops,
                torch.tensor(float(self.batch_flops), device=self.device),
            ]
            + [self.sums[k] for k in keys]
        ).double()
        self.all_reduce(vec)
        values = vec.tolist()
        tokens, masked, head_flops, flops = int(values[0]), int(values[1]), values[2], values[3]
        self.tokens_seen += tokens
        self.masked_tokens_seen += masked
        denom = max(1, self.micro * self.world_size)
        out = {k: v / denom for k, v in zip(keys, values[4:], strict=False)}
        out.update(tokens=tokens, masked=masked, flops=flops + head_flops)
        return out

    def record(self, step: int, epoch: int, grad_norm: float | None, loss_scale: float) -> dict[str, Any] | None:
        """Sync (collective) and return the interval's train record (None when nothing was accumulated); resets."""
        if not self.pending():
            return None
        steps, skipped, lr = self.steps, self.skipped, self.lr
        synced = self.sync()
        now = time.perf_counter()
        elapsed, self._t0 = now - self._t0, now
        self._reset()
        losses = {k: v for k, v in synced.items() if k.startswith("loss")}
        self.loss_keys = sorted(set(self.loss_keys) | set(losses))
        flops_per_s = synced["flops"] / elapsed if elapsed > 0 else 0.0
        return {
            "split": "train",
            "step": step,
            "epoch": epoch,
            "tokens_seen": self.tokens_seen,
            "masked_tokens_seen": self.masked_tokens_seen,
            **{k: losses.get(k) for k in self.loss_keys},  # None: every step of the interval was skipped
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_scale": loss_scale,
            "tokens_per_s": synced["tokens"] / elapsed if elapsed > 0 else 0.0,
            "seconds_per_step": elapsed / steps,
            "model_flops_per_s": flops_per_s,
            "mfu": flops_per_s / (self.peak_flops * self.world_size) if self.peak_flops else None,
            "skipped_steps": skipped,
            "time": time.time(),
        }

    def restart_clock(self) -> None:
        """Start timing the next interval now (after set-up, an evaluation or a save that should not count)."""
        self._t0 = time.perf_counter()

    def state_dict(self) -> dict[str, int]:
        """The counters a checkpoint keeps: ``tokens_seen``, ``masked_tokens_seen`` (all ranks, since the start)."""
        return {"tokens_seen": self.tokens_seen, "masked_tokens_seen": self.masked_tokens_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the tokens seen from a checkpoint's client state."""
        self.tokens_seen = int(state["tokens_seen"])
        self.masked_tokens_seen = int(state["masked_tokens_seen"])


def console_line(rec: dict[str, Any], max_steps: int) -> str:
    """The console line of a train record."""
    terms = " ".join(f"{k[5:]} {_fmt(v)}" for k, v in rec.items() if k.startswith("loss_") and k != "loss_scale")
    eta = (max_steps - rec["step"]) * rec["seconds_per_step"]
    mfu = f" | MFU {rec['mfu']:.1%}" if rec.get("mfu") is not None else ""
    return (
        f"step {rec['step']}/{max_steps} | loss {_fmt(rec.get('loss'))} ({terms}) | lr {rec['lr']:.2e} | "
        f"grad {_fmt(rec['grad_norm'], 3)} | {rec['tokens_per_s']:,.0f} tok/s{mfu} | "
        f"{rec['seconds_per_step']:.2f} s/step | {rec['tokens_seen'] / 1e6:.2f}M tokens | eta {eta / 60:.1f} min"
        + (f" | {rec['skipped_steps']} skipped" if rec["skipped_steps"] else "")
    )


def start_line(
    *,
    world_size: int,
    device: str,
    precision: str,
    stage: int,
    plan: BatchPlan,
    model: DistillationModel,
    layer_map: list[int],
    resumed_from: Path | None,
    step: int,
    tokens_seen: int,
    run_dir: Path,
) -> str:
    """The console line that starts a run: ranks, ``device`` type, precision, ZeRO ``stage``, the batch ``plan``,
    the sizes of ``model``'s teacher and student (parameters) and the student's ``layer_map``, and either the
    checkpoint ``resumed_from`` (with its ``step`` and ``tokens_seen``) or "fresh run", and the run directory."""
    n_s = sum(p.numel() for p in model.student.parameters())
    n_t = sum(p.numel() for p in model.teacher.parameters())
    start = (
        f"resumed from {resumed_from} (step {step}, {tokens_seen:,} tokens seen)"
        if resumed_from is not None
        else "fresh run"
    )
    return (
        f"[pretrain] {world_size} rank(s) on {device}, {precision}, ZeRO-{stage}; "
        f"{plan.train_batch_size} sequences/step = micro {plan.micro_batch} x accumulation "
        f"{plan.accumulation} x {world_size} ranks; teacher {n_t / 1e6:.1f}M -> student "
        f"{n_s / 1e6:.1f}M parameters (layers {layer_map}); {start}; run dir {run_dir}"
    )


def valid_line(rec: dict[str, Any]) -> str:
    """The console line of a valid record: the task metrics first in task distillation (``task_<metric>``,
    ``task_score``, ``teacher_score``), then the pretraining / agreement fields present."""
    task = [k for k in rec if k.startswith("task_") and k != "task_score" and isinstance(rec[k], (int, float))]
    shown = " | ".join(
        f"{k} {rec[k]:.4f}"
        for k in (
            *task,
            "task_score",
            "teacher_score",
            "mlm_loss",
            "perplexity",
            "mlm_accuracy",
            "kl_to_teacher",
            "agreement",
            "hidden_cosine",
            "pooled_cosine",
        )
        if k in rec
    )
    return f"valid @ step {rec['step']} | {shown}"
