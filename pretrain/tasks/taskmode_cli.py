"""The command line of task distillation's tools: ``python -m pretrain.taskmode evaluate`` (or
``bert-distill-taskmode``)."""

from __future__ import annotations

import argparse
import json
import sys

from data_prep.cli import HelpFormatter, prog
from data_prep.errors import DistillError
from pretrain.tasks.base import SplitConfig, TaskError
from pretrain.tasks.registry import load_task
from pretrain.tasks.scoring import evaluate_classifier

DESCRIPTION = (
    "Tools of task distillation. evaluate: the metrics of saved classifiers (--model NAME=DIR, repeatable) on a "
    "split of a task, as they are, as JSON on stdout."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line (argparse exits 2 on a malformed one)."""
    p = argparse.ArgumentParser(
        prog=prog("python -m pretrain.taskmode"), description=DESCRIPTION, formatter_class=HelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser(
        "evaluate",
        help="score saved classifiers on a task split",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    e.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a saved sequence classifier under a display name (repeatable)",
    )
    e.add_argument("--task", required=True, metavar="SPEC", help="the task, e.g. embedded:rotten-tomatoes, glue:sst2")
    e.add_argument("--split", default="test", help="the task split to score")
    e.add_argument("--split-seed", type=int, default=0, help="seed of the deterministic splits and caps")
    e.add_argument("--max-eval", type=int, default=1000, help="cap on the split (stratified; 0 = all)")
    e.add_argument("--max-length", type=int, default=128, help="tokens per example (truncation)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.taskmode evaluate --model NAME=DIR ... --task T [--split test]``: metrics of saved
    classifiers on a task split, as they are (JSON on stdout); exit 2 on bad input (the error's ``exit_code``)."""
    args = parse_args(argv)
    try:
        task = load_task(args.task, split=SplitConfig(seed=args.split_seed, max_eval=args.max_eval or None))
        if args.split not in task.splits:
            raise TaskError(f"--split {args.split}: {task.name} has {sorted(task.splits)}")
        models = {}
        for m in args.model:
            name, sep, path = m.partition("=")
            if not sep:
                raise TaskError(f"--model {m!r}: expected NAME=DIR")
            models[name] = path
    except DistillError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
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
