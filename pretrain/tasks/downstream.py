"""The downstream evaluation's driver: every model fine-tuned (or probed) on every task with one protocol, the result
summarised and written (``downstream.json`` / ``.md`` / ``.png``).

The result (:func:`run_downstream`'s return value and ``downstream.json``): ``{"version", "complete": True, "mode",
"seeds", "teacher", "student", "models": {name: {path, params, layers, hidden, inference_examples_per_s}}, "tasks":
{task: {kind, metrics, report_splits, settings, manifest, results: {model: {runs: [...], score_mean, score_std,
metrics_mean, metrics_std, share_of_teacher}}}}, "macro", "gains", "timing", "notes"}``. Scores are fractions
(accuracy) or correlations, not percent.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pretrain.tasks.base import DownstreamError, LocalFields, SplitConfig, Task, slug
from pretrain.tasks.finetune import FinetuneConfig, defaults_for, finetune
from pretrain.tasks.models import ModelSpec, check_model, resolve_device
from pretrain.tasks.probe import probe
from pretrain.tasks.registry import known_tasks, load_task
from pretrain.tasks.summary import summarise, write_outputs

log = logging.getLogger("pretrain.downstream")
RESULT_VERSION = 1
RUN_ROLES = ("teacher", "student_init", "truncation", "student")
NOTES = {
    "embedded:wiki-topic": "embedded:wiki-topic: the demo distils on these same Wikipedia texts without "
    "labels; its test split is the documents held out of the demo's distillation"
}


# 67 lines: the public signature has 15 keyword arguments, each documented in the docstring
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
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune (or probe) every model on every task with one protocol; write ``downstream.json``, ``downstream.md``
    and ``downstream.png`` into ``output`` (atomically, the JSON last) and return the result dict.

    Args:
        tasks: task specs (:func:`pretrain.tasks.load_task`).
        models: :class:`ModelSpec` list or ``{name: path}`` (ordered: the table's order).
        mode: ``finetune`` or ``probe``.
        seeds: fine-tuning runs per model and task (seeds 0..N-1), >= 1.
        split: split seed / fractions / caps; ``max_train`` / ``max_eval`` default per family
            (:func:`pretrain.tasks.finetune.defaults_for`) when None.
        overrides: FinetuneConfig fields replacing the family defaults (e.g. ``{"epochs": 1}``).
        teacher / student: the reference model (shares) and the distilled student (gains); default ``teacher`` /
            ``student`` when present, else the first / the last model unless that is a run's role (no gains).
        progress: called with one line per finished run (default: print to stdout).
        save_model: folder: the seed-0 fine-tuned model of each model and task is saved to
            ``save_model/<model>/<task>`` (e.g. a fine-tuned teacher for task distillation).

    Returns:
        the result dict (the module docstring has its layout).

    Raises:
        DownstreamError: bad seeds / mode / model / override; TaskError: bad task (see ``load_task``). Both before any
        training, so nothing is written; a previous ``downstream.json`` is moved to ``downstream.prev.json`` only
        once the inputs check out.
    """
    t_start = time.perf_counter()
    progress = progress or (lambda msg: print(msg, flush=True))
    specs = _check_inputs(tasks, models, mode, seeds)
    overrides = _check_overrides(overrides)
    dev_ = resolve_device(device)
    loaded = _load_tasks(tasks, split or SplitConfig(), fields, overrides)
    for spec in specs:
        check_model(spec)
    teacher, student = _roles([s.name for s in specs], teacher, student)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "downstream.json").exists():  # the inputs checked out: keep the previous result aside
        os.replace(out / "downstream.json", out / "downstream.prev.json")
    result = _new_result(mode, seeds, teacher, student, dev_, specs)
    for task, cfg in loaded:
        entry = result["tasks"][task.name] = _task_entry(task, cfg)
        result["notes"] += [NOTES[task.name]] if task.name in NOTES else []
        for spec in specs:
            runs = _runs(spec, task, cfg, mode, result["seeds"], dev_, save_model, progress)
            entry["results"][spec.name] = {"runs": runs}
    summarise(result)
    result["timing"] = {"seconds": time.perf_counter() - t_start}
    result["complete"] = True
    write_outputs(result, out, plot=plot)
    return result


def _check_inputs(
    tasks: Sequence[str], models: Sequence[ModelSpec] | dict[str, str], mode: str, seeds: int
) -> list[ModelSpec]:
    """The model specs, after checking the mode, seeds, tasks and model names. Raises :class:`DownstreamError`."""
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
    return specs


def _check_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of the fine-tuning overrides, checked. Raises :class:`DownstreamError` naming the flag."""
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
    return overrides


def _load_tasks(
    tasks: Sequence[str], split: SplitConfig, fields: LocalFields | None, overrides: dict[str, Any]
) -> list[tuple[Task, FinetuneConfig]]:
    """Each task with its settings (the family's defaults, then the overrides; the split's caps default to the
    settings'). Raises :class:`DownstreamError` for a task given twice, :class:`TaskError` for a bad one."""
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
    return loaded


def _roles(names: list[str], teacher: str | None, student: str | None) -> tuple[str, str | None]:
    """The reference model (shares) and the distilled student (gains; None: no gains). Raises
    :class:`DownstreamError` for a name that is not a model's."""
    teacher = teacher or ("teacher" if "teacher" in names else names[0])
    if student is None:  # a run without student/ has no distilled model: no gains then
        student = (
            "student" if "student" in names else (names[-1] if len(names) > 1 and names[-1] not in RUN_ROLES else None)
        )
    for flag, v in (("--teacher", teacher), ("--student", student)):
        if v is not None and v not in names:
            raise DownstreamError(f"{flag} {v}: not one of the models {names}")
    return teacher, student


def _new_result(
    mode: str, seeds: int, teacher: str, student: str | None, device: torch.device, specs: list[ModelSpec]
) -> dict[str, Any]:
    """The result before any task has run (``complete`` False)."""
    return {
        "version": RESULT_VERSION,
        "complete": False,
        "mode": mode,
        "seeds": seeds if mode == "finetune" else 1,
        "teacher": teacher,
        "student": student,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "models": {s.name: {"path": s.path, "params": s.params, "layers": s.layers, "hidden": s.hidden} for s in specs},
        "tasks": {},
        "notes": [],
    }


def _task_entry(task: Task, cfg: FinetuneConfig) -> dict[str, Any]:
    """A task's entry of the result, before its runs."""
    return {
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


def _runs(
    spec: ModelSpec,
    task: Task,
    cfg: FinetuneConfig,
    mode: str,
    n_seeds: int,
    device: torch.device,
    save_model: str | os.PathLike | None,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """One model's runs on one task (seeds 0..n_seeds-1), each reported through ``progress``."""
    runs = []
    for seed in range(n_seeds):
        t0 = time.perf_counter()
        if mode == "finetune":
            save = (Path(save_model) / spec.name / slug(task.name)) if save_model and seed == 0 else None
            r = finetune(spec, task, cfg, seed, device=device, save_dir=save)
        else:
            r = probe(spec, task, cfg, device=device)
        r["seconds"] = time.perf_counter() - t0
        runs.append(r)
        progress(
            f"[downstream] {task.name} {spec.name} seed {seed}: score {r['score']:.4f} "
            f"({_fmt_metrics(r['metrics'])}; {r['seconds']:.0f} s)"
            + (f"; saved to {save}" if mode == "finetune" and save is not None else "")
        )
    return runs


def _fmt_metrics(metrics: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{s} {k} {v:.4f}" for s, d in metrics.items() for k, v in d.items())
