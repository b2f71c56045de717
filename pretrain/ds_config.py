"""The DeepSpeed config of a run, derived from the validated run config once the world size is known.

The ``deepspeed`` section of a run config is an ordinary DeepSpeed config; :func:`build` fills in what it leaves out
with the DistilBERT recipe (Sanh et al., 2019; Hugging Face ``research_projects/distillation``: AdamW with train.py's
defaults lr 5e-4, eps 1e-6, no weight decay, gradient clipping 5.0, linear warm-up over 5% of the steps then linear
decay, and the betas (0.9, 0.98) its distiller.py sets) and derives the batch arithmetic
``train_batch_size = micro x accumulation x world size`` (:func:`batch_sizes`), with one clear error when it cannot
hold. :func:`check_static` checks what can be checked before launch.
"""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

from pretrain.schema import ConfigError, check

DEFAULT_OPTIMIZER: dict[str, Any] = {
    "type": "AdamW",
    "params": {"lr": 5e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.0},
}
DEFAULT_GRADIENT_CLIPPING = 5.0
DEFAULT_WARMUP_PROPORTION = 0.05
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
WARMUP_TYPES = ("linear", "log")  # DeepSpeed's warm-up shapes (it takes any other name as "log", with a warning)


class BatchPlan(NamedTuple):
    """Sequences per optimizer step (all ranks), per micro-batch (one rank), and micro-batches per step."""

    train_batch_size: int
    micro_batch: int
    accumulation: int


def precision(ds: dict) -> str:
    """``"fp16"``, ``"bf16"`` or ``"fp32"`` from a DeepSpeed config dict."""
    if (ds.get("fp16") or {}).get("enabled", False):
        return "fp16"
    if (ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled", False):
        return "bf16"
    return "fp32"


def zero_stage(ds: dict) -> int:
    """ZeRO stage (0 when ``zero_optimization`` is absent)."""
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


class Resolved(NamedTuple):
    """A run's DeepSpeed config once the world size is known (:func:`resolve`)."""

    config: dict
    plan: BatchPlan
    precision: str
    stage: int


def resolve(ds_section: dict, *, max_steps: int, world_size: int, cuda: bool) -> Resolved:
    """:func:`build`'s config (arguments as there) with its batch plan, precision and ZeRO stage. Raises
    :class:`ConfigError` as :func:`build` does."""
    ds = build(ds_section, max_steps=max_steps, world_size=world_size, cuda=cuda)
    return Resolved(ds, BatchPlan(*(ds[k] for k in BATCH_KEYS)), precision(ds), zero_stage(ds))


def _positive_int(ds: dict, key: str) -> int | None:
    value = ds.get(key)
    if value is None or value == "auto":
        return None
    check(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"deepspeed.{key}",
        f"{value!r} must be a positive integer",
    )
    return value


def batch_sizes(ds: dict, world_size: int) -> BatchPlan:
    """Derive the batch arithmetic for ``world_size`` data-parallel ranks.

    Any two of ``train_batch_size`` (sequences per optimizer step, all ranks), ``train_micro_batch_size_per_gpu``
    (sequences per forward, one rank) and ``gradient_accumulation_steps`` give the third; ``train_batch_size`` alone
    means no accumulation; the micro-batch alone means no accumulation. All three must satisfy
    ``train_batch_size == micro x accumulation x world_size``.

    Raises :class:`ConfigError` naming the numbers when the product cannot hold (for example 4096 sequences per step
    with micro-batch 16 on 3 ranks: 4096 is not a multiple of 48).
    """
    tbs, micro, gas = (_positive_int(ds, k) for k in BATCH_KEYS)
    ws = int(world_size)
    if tbs and micro and gas:
        if tbs != micro * gas * ws:
            raise ConfigError(
                f"deepspeed.train_batch_size: {tbs} != train_micro_batch_size_per_gpu {micro} x "
                f"gradient_accumulation_steps {gas} x world size {ws} = {micro * gas * ws}; give only two of the three "
                f"and the third is derived"
            )
    elif tbs and micro:
        if tbs % (micro * ws):
            raise ConfigError(
                f"deepspeed.train_batch_size: {tbs} sequences per step is not a multiple of "
                f"train_micro_batch_size_per_gpu {micro} x world size {ws} = {micro * ws}; change the micro-batch or "
                f"the number of ranks so that it divides {tbs}"
            )
        gas = tbs // (micro * ws)
    elif tbs and gas:
        if tbs % (gas * ws):
            raise ConfigError(
                f"deepspeed.train_batch_size: {tbs} is not a multiple of gradient_accumulation_steps {gas} x world "
                f"size {ws} = {gas * ws}"
            )
        micro = tbs // (gas * ws)
    elif micro and gas:
        tbs = micro * gas * ws
    elif tbs:
        if tbs % ws:
            raise ConfigError(
                f"deepspeed.train_batch_size: {tbs} is not a multiple of the world size {ws}; give "
                f"train_micro_batch_size_per_gpu as well, or change the number of ranks"
            )
        micro, gas = tbs // ws, 1
    elif micro:
        gas = 1
        tbs = micro * ws
    else:
        raise ConfigError(
            "deepspeed: give train_batch_size (sequences per optimizer step) and/or "
            "train_micro_batch_size_per_gpu (sequences per forward on one rank)"
        )
    return BatchPlan(tbs, micro, gas)


def _number(value) -> bool:
    """A JSON number (not a bool); NaN and infinities count as numbers here and are refused by the range checks."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(params: dict, key: str, where: str, rule: str, ok) -> None:
    """Check ``params[key]`` (when given) is a finite number satisfying ``ok``; the message names ``where.key``."""
    if key in params:
        value = params[key]
        check(
            _number(value) and math.isfinite(value) and ok(value),
            f"{where}.{key}",
            f"{value!r} must be a finite number {rule}",
        )


def _check_optimizer_params(params: dict) -> None:
    """lr, betas, eps and weight decay of ``deepspeed.optimizer.params`` (each when given): the ranges
    ``torch.optim.AdamW`` and DeepSpeed's Adam / Lamb accept, with NaN and infinities refused."""
    where = "deepspeed.optimizer.params"
    _check_number(params, "lr", where, "> 0 (the DistilBERT recipe: 5e-4)", lambda v: v > 0)
    _check_number(params, "eps", where, ">= 0 (the DistilBERT recipe: 1e-6)", lambda v: v >= 0)
    _check_number(params, "weight_decay", where, ">= 0 (the DistilBERT recipe: 0.0)", lambda v: v >= 0)
    if "betas" in params:
        betas = params["betas"]
        check(
            isinstance(betas, (list, tuple))
            and len(betas) == 2
            and all(_number(b) and math.isfinite(b) and 0 <= b < 1 for b in betas),
            f"{where}.betas",
            f"{betas!r} must be two numbers in [0, 1), [beta1, beta2] (the DistilBERT recipe: [0.9, 0.98])",
        )


def _check_scheduler_params(params: dict, max_steps: int) -> None:
    """The step counts and learning rates of ``deepspeed.scheduler.params`` (each when given) for DeepSpeed's
    WarmupLR / WarmupDecayLR / WarmupCosineLR."""
    where = "deepspeed.scheduler.params"
    total = params.get("total_num_steps", max_steps)
    check(
        isinstance(total, int) and not isinstance(total, bool) and total >= 1,
        f"{where}.total_num_steps",
        f"{total!r} must be a positive integer (steps of the schedule; default train.max_steps = {max_steps})",
    )
    warm = params.get("warmup_num_steps", 1)
    check(
        isinstance(warm, int) and not isinstance(warm, bool) and 1 <= warm <= total,
        f"{where}.warmup_num_steps",
        f"{warm!r} must be an integer between 1 and the schedule's {total} steps (DeepSpeed refuses 0 and warms "
        f"up over at least 2 steps)",
    )
    _check_number(
        params, "warmup_min_lr", where, ">= 0 (the learning rate at the start of the warm-up)", lambda v: v >= 0
    )
    _check_number(params, "warmup_max_lr", where, "> 0 (the learning rate at the end of the warm-up)", lambda v: v > 0)
    low, high = params.get("warmup_min_lr", 0.0), params.get("warmup_max_lr")
    if high is not None:
        check(low <= high, f"{where}.warmup_min_lr", f"{low!r} must be <= warmup_max_lr {high!r}")
    for key in ("warmup_min_ratio", "cos_min_ratio"):
        _check_number(params, key, where, "in [0, 1] (a fraction of the optimizer's lr)", lambda v: 0 <= v <= 1)
    if "warmup_type" in params:
        check(
            params["warmup_type"] in WARMUP_TYPES,
            f"{where}.warmup_type",
            f"{params['warmup_type']!r} is not one of {list(WARMUP_TYPES)}",
        )


def _check_batch_keys(ds: dict) -> None:
    """The batch keys that no world size can reconcile: none given, or a step that is not a whole number of
    micro-batches (x accumulation). Raises :class:`ConfigError` naming ``deepspeed.train_batch_size``."""
    tbs, micro, gas = (_positive_int(ds, k) for k in BATCH_KEYS)
    check(
        bool(tbs or micro),
        "deepspeed.train_batch_size",
        "missing: give train_batch_size (sequences per optimizer step) and/or train_micro_batch_size_per_gpu",
    )
    if tbs and micro:
        check(
            tbs % micro == 0,
            "deepspeed.train_batch_size",
            f"{tbs} sequences per step is not a multiple of train_micro_batch_size_per_gpu {micro} (a step is micro "
            f"x accumulation x ranks sequences): change one of them",
        )
    if tbs and micro and gas:
        check(
            tbs % (micro * gas) == 0,
            "deepspeed.train_batch_size",
            f"{tbs} is not micro {micro} x accumulation {gas} x a whole number of ranks; give only two of the "
            f"three and the third is derived",
        )


def check_static(ds: dict, max_steps: int) -> None:
    """Checks of a ``deepspeed`` section that need no world size.

    Args:
        ds: the run config's ``deepspeed`` section (a DeepSpeed config dict, before :func:`build`).
        max_steps: ``train.max_steps``, the schedule's default length.

    Checks every key against DeepSpeed's own schema (:func:`pretrain.ds_schema.check`: unknown keys with a "did you
    mean", the pydantic-described sections by their models), then the batch keys, precision, ZeRO stage, gradient
    clipping, and the optimizer's and scheduler's parameters
    that the section gives (lr, betas, eps, weight decay, warm-up and schedule length, warm-up learning rates), so that
    a NaN or negative value is refused here rather than by torch at the first step. Raises :class:`ConfigError`
    naming ``deepspeed.<key>``.
    """
    from pretrain import ds_schema  # imports DeepSpeed: only when a section is checked

    ds_schema.check(ds)
    _check_batch_keys(ds)
    for key in ("fp16", "bf16", "zero_optimization", "optimizer", "scheduler"):
        if key in ds:
            check(isinstance(ds[key], dict), f"deepspeed.{key}", f"{ds[key]!r} must be an object")
    check(
        not (precision(ds) == "fp16" and (ds.get("bf16") or {}).get("enabled", False)),
        "deepspeed.bf16.enabled",
        "fp16 and bf16 are both enabled; enable one of them (or neither for fp32)",
    )
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    check(stage in (0, 1, 2, 3), "deepspeed.zero_optimization.stage", f"{stage!r} must be 0, 1, 2 or 3")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            check(
                isinstance(ds[key].get("type"), str), f"deepspeed.{key}.type", f"missing or not a string in {ds[key]!r}"
            )
            check(isinstance(ds[key].get("params", {}), dict), f"deepspeed.{key}.params", "must be an object")
    clip = ds.get("gradient_clipping", DEFAULT_GRADIENT_CLIPPING)
    check(
        _number(clip) and math.isfinite(clip) and clip >= 0,
        "deepspeed.gradient_clipping",
        f"{clip!r} must be a finite number >= 0 (0 = no clipping)",
    )
    _check_optimizer_params((ds.get("optimizer") or {}).get("params", {}))
    _check_scheduler_params((ds.get("scheduler") or {}).get("params", {}), max_steps)


def build(ds_section: dict, *, max_steps: int, world_size: int, cuda: bool) -> dict:
    """The DeepSpeed config dict for ``deepspeed.initialize``.

    Args:
        ds_section: the run config's ``deepspeed`` section, checked by :func:`check_static` (not modified).
        max_steps: ``train.max_steps``, the default length of the learning-rate schedule.
        world_size: data-parallel ranks.
        cuda: whether the ranks run on CUDA GPUs (on CPU, fp16 is refused and Adam runs as ``torch.optim.AdamW``).

    Returns a new dict: the section with the batch sizes derived (:func:`batch_sizes`), the optimizer, scheduler and
    gradient clipping defaults of the DistilBERT recipe filled in, and DeepSpeed's own progress printing off.
    Raises :class:`ConfigError` for an impossible batch plan or fp16 without a GPU.
    """
    ds = copy.deepcopy(ds_section)
    plan = batch_sizes(ds, world_size)
    ds.update(zip(BATCH_KEYS, plan, strict=False))
    if precision(ds) == "fp16" and not cuda:
        raise ConfigError(
            "deepspeed.fp16.enabled: fp16 needs a CUDA GPU and none is visible; on CPU set "
            "deepspeed.fp16.enabled=false (fp32) or deepspeed.bf16.enabled=true"
        )
    if precision(ds) == "fp16":
        ds["fp16"].setdefault("loss_scale", 0)  # 0 = dynamic loss scaling
    opt = ds.setdefault("optimizer", copy.deepcopy(DEFAULT_OPTIMIZER))
    params = opt.setdefault("params", {})
    if opt["type"].lower() in ("adam", "adamw"):
        for key, value in DEFAULT_OPTIMIZER["params"].items():
            params.setdefault(key, copy.deepcopy(value))
        if not cuda:
            params.setdefault("torch_adam", True)  # DeepSpeed's fused CPU Adam would compile an op at start
        if params.get("torch_adam") and not params.get("foreach"):
            params.setdefault("fused", True)  # torch's fused AdamW: one kernel per step, not ~8 per tensor
    lr = params.get("lr", DEFAULT_OPTIMIZER["params"]["lr"])
    sched = ds.setdefault("scheduler", {"type": "WarmupDecayLR"})
    sp = sched.setdefault("params", {})
    if sched["type"] in ("WarmupDecayLR", "WarmupCosineLR"):
        sp.setdefault("total_num_steps", max_steps)
        # at least 1: DeepSpeed refuses 0 (and warms up over max(2, n) steps)
        sp.setdefault("warmup_num_steps", max(1, round(DEFAULT_WARMUP_PROPORTION * sp["total_num_steps"])))
    if sched["type"] in ("WarmupDecayLR", "WarmupLR"):
        sp.setdefault("warmup_min_lr", 0.0)
        sp.setdefault("warmup_max_lr", lr)
        sp.setdefault("warmup_type", "linear")
    ds.setdefault("gradient_clipping", DEFAULT_GRADIENT_CLIPPING)
    ds.setdefault("zero_optimization", {"stage": 0})
    ds.setdefault("steps_per_print", 2**31 - 1)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
