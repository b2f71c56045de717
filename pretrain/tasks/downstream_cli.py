"""The command line of the downstream evaluation: ``python -m pretrain.downstream`` (``bert-distill-downstream``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from data_prep.cli import HelpFormatter, prog
from data_prep.errors import DistillError
from pretrain.tasks.base import DownstreamError, LocalFields, SplitConfig
from pretrain.tasks.downstream import run_downstream
from pretrain.tasks.embedded import EMBEDDED
from pretrain.tasks.glue import GLUE
from pretrain.tasks.models import ModelSpec, run_models
from pretrain.tasks.registry import DEFAULT_TASK, OFFLINE_TASKS, known_tasks
from pretrain.tasks.summary import render_downstream_markdown

OVERRIDES = ("epochs", "lr", "batch_size", "max_length", "warmup_ratio", "weight_decay", "head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line (argparse exits 2 on a malformed one)."""
    p = argparse.ArgumentParser(
        prog=prog("python -m pretrain.downstream"),
        formatter_class=HelpFormatter,
        description="Fine-tune (or probe) models on labeled tasks and write downstream.json / .md / .png. "
        f"Tasks: {', '.join(known_tasks())}.",
    )
    p.add_argument(
        "--task",
        action="append",
        default=None,
        metavar="SPEC",
        help=f"task (repeatable; default: {DEFAULT_TASK}). Offline: {', '.join(OFFLINE_TASKS)}",
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
    p.add_argument("--output", metavar="DIR", help="where to write downstream.* (default: RUNDIR/downstream)")
    p.add_argument(
        "--mode",
        choices=("finetune", "probe"),
        default="finetune",
        help="finetune the whole model, or probe (train only the head on frozen states)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="fine-tuning runs per model and task, seeds 0..N-1 (default: %(default)s; "
        "pretrain.evaluate's --downstream-seeds defaults to 2)",
    )
    p.add_argument(
        "--teacher",
        metavar="NAME[=PATH]",
        help="the model the shares refer to: NAME=PATH adds the model (PATH as in pretrain.evaluate's --teacher: "
        "folder, hub name or embedded:NAME) under NAME; a bare NAME names one of the models "
        "(default: teacher, else the first)",
    )
    p.add_argument(
        "--student",
        metavar="NAME[=PATH]",
        help="the distilled model compared with the baselines: NAME=PATH adds it, a bare NAME names one of the "
        "models (default: student, else the last)",
    )
    g = p.add_argument_group("fine-tuning settings (default: per task family, see docs/downstream.md)")
    g.add_argument("--epochs", type=int, help="passes over the train split")
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    g.add_argument("--batch-size", type=int, help="examples per optimizer step")
    g.add_argument("--max-length", type=int, help="tokens per example (truncation)")
    g.add_argument("--warmup-ratio", type=float, help="share of the steps with a linear learning-rate warm-up")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay")
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
    s.add_argument("--text-field", default="text", help="field of the text in local csv/jsonl tasks")
    s.add_argument("--pair-field", default=None, help="second text of pair tasks (csv/jsonl)")
    s.add_argument("--label-field", default="label", help="field of the label in local csv/jsonl tasks")
    s.add_argument(
        "--task-type",
        choices=("auto", "classification", "regression"),
        default="auto",
        help="kind of a local task; auto: regression when the labels are non-integer numbers",
    )
    p.add_argument("--save-model", metavar="DIR", help="save each seed-0 fine-tuned model to DIR/<model>/<task>")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    p.add_argument("--no-plot", action="store_true", help="do not draw downstream.png")
    p.add_argument("--list-tasks", action="store_true", help="print the known tasks and exit")
    return p.parse_args(argv)


def list_tasks() -> None:
    """Print the known tasks, one a line (``--list-tasks``)."""
    for t in GLUE:
        print(f"glue:{t}\t{', '.join(GLUE[t][2])} (hub)")
    for t, what in EMBEDDED.items():
        print(f"embedded:{t}\t{what} (offline)")
    print("csv:PATH / jsonl:PATH\tlocal file or folder with train/dev[/test] files")


def models_of(args: argparse.Namespace, output: Path) -> list[ModelSpec]:
    """The models of ``--run`` (built truncation baseline included), ``--teacher NAME=PATH``, each ``--model
    NAME=PATH`` and ``--student NAME=PATH``, in that order (a bare ``--teacher``/``--student`` NAME adds none).
    Raises :class:`DownstreamError` for a malformed ``--model``, ``--teacher`` or ``--student``."""
    models: list[ModelSpec] = []
    if args.run:
        models += run_models(args.run, output)
    items = [("--teacher", args.teacher)] * bool(args.teacher and "=" in args.teacher)
    items += [("--model", m) for m in args.model]
    items += [("--student", args.student)] * bool(args.student and "=" in args.student)
    for flag, item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DownstreamError(f"{flag} {item!r}: expected NAME=PATH")
        models.append(ModelSpec(name, path))
    return models


def run(args: argparse.Namespace) -> tuple[dict, Path]:
    """Run the evaluation the arguments describe; returns (result, output folder). Raises :class:`DistillError`
    subclasses on bad input, before anything is written."""
    if args.output is None and args.run is None:
        raise DownstreamError("--output DIR is required without --run")
    if args.seeds < 1:  # before building anything
        raise DownstreamError(f"--seeds {args.seeds}: give at least 1 (fine-tuning runs per model and task)")
    output = Path(args.output or Path(args.run) / "downstream")
    models = models_of(args, output)
    split = SplitConfig(
        seed=args.split_seed,
        max_train=None if args.max_train is None else (args.max_train or 10**12),
        max_eval=None if args.max_eval is None else (args.max_eval or 10**12),
    )
    result = run_downstream(
        args.task or [DEFAULT_TASK],
        models,
        output,
        mode=args.mode,
        seeds=args.seeds,
        split=split,
        fields=LocalFields(text=args.text_field, pair=args.pair_field, label=args.label_field, kind=args.task_type),
        overrides={k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None},
        teacher=args.teacher and args.teacher.partition("=")[0],
        student=args.student and args.student.partition("=")[0],
        device=args.device,
        save_model=args.save_model,
        plot=not args.no_plot,
    )
    return result, output


def wrote_line(output: Path, *, plot: bool) -> str:
    """The files the command wrote, for its last line; ``downstream.png`` only when ``plot`` (not ``--no-plot``)."""
    return f"wrote {output / 'downstream.json'}, downstream.md" + (", downstream.png" if plot else "")


def main(argv: list[str] | None = None) -> int:
    """The CLI; exit status 0 on success, the error's ``exit_code`` (2 for bad input) on a user error (message on
    stderr, no ``downstream.json`` written)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.list_tasks:
        list_tasks()
        return 0
    try:
        result, output = run(args)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(render_downstream_markdown(result))
    print(f"[downstream] {wrote_line(output, plot=not args.no_plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
