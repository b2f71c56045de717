"""The trainer's command line: one process = one rank (``python -m pretrain.main`` / ``bert-distill-pretrain``).

    deepspeed [--num_gpus N] launch/pretrain.py --config configs/distilroberta.json [section.key=value ...]
    deepspeed [--num_gpus N] --module pretrain.main --config C ...        (the same, without the wrapper)
    deepspeed --hostfile H launch/pretrain.py --config C ...              (multi-node, pdsh)
    deepspeed --hostfile H --no_ssh --node_rank R --master_addr A launch/pretrain.py --config C  (one launcher per node)
    torchrun --nproc_per_node N launch/pretrain.py --config C ...         (or: torchrun ... -m pretrain.main ...)
    python launch/pretrain.py --config C ...                              (one process, no launcher)
    bert-distill-pretrain --config C ...                                  (the installed command, one process)

``launch/pretrain.py`` is a thin wrapper that replaces itself with ``python -m pretrain.main`` (see its docstring);
the SLURM batch script of ``bert-distill-slurm submit`` runs ``python -m pretrain.main`` directly.

On a machine without CUDA the ranks run on CPU (DeepSpeed's CPU accelerator, gloo): ``deepspeed --num_gpus N`` starts
N CPU ranks (without --num_gpus, DeepSpeed starts one rank per NUMA node); each rank uses cores / local ranks torch
threads unless OMP_NUM_THREADS is set. Running the same command again resumes from ``train.output_dir/checkpoints/
latest``. SIGTERM or SIGUSR1 to the ranks: they finish the current step, checkpoint together and exit 0.

Exit codes: 0 done or stopped by a signal after checkpointing; 1 a run error with a one-line message
(``pretrain.runtime.RunError``: diverged, a checkpoint that cannot be written, another rank failed, torch too old);
2 configuration or input error (the message names the file / key and what to do).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from data_prep.cli import HelpFormatter, prog


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog("python -m pretrain.main"),  # also what launch/pretrain.py runs
        formatter_class=HelpFormatter,
        description="Task-agnostic distillation pretraining (DeepSpeed).",
        epilog="Overrides: any config field as section.key=value, e.g. train.max_steps=100 "
        "deepspeed.zero_optimization.stage=3 (values parsed as JSON when they parse).",
    )
    p.add_argument(
        "--config", required=True, help="run config JSON (see configs/ and `python -m pretrain.config --reference`)"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # from launchers
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides (see the epilog)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train one rank with the config and overrides of ``argv``; returns the exit code (module docstring)."""
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from data_prep.errors import DistillError
    from pretrain.config import load
    from pretrain.schema import ConfigError

    rank = os.environ.get("RANK", "0")
    try:
        cfg = load(args.config, args.overrides)
        from pretrain.trainer import run

        return run(cfg)
    except ConfigError as e:
        print(
            f"[rank {rank}] error: {args.config}: {e}"
            if not str(e).startswith(args.config)
            else f"[rank {rank}] error: {e}",
            file=sys.stderr,
            flush=True,
        )
        return e.exit_code
    except DistillError as e:  # diverged, a full disk, another rank failed, a corrupted shard, old torch: one line
        print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        # A USR1/TERM that arrives while a finished rank shuts down would kill it with the signal's default action
        # (Python restores defaults at exit; seen under SLURM as exit 138/143): the work is saved, so ignore them.
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


if __name__ == "__main__":
    sys.exit(main())
