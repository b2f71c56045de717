#!/usr/bin/env python
"""Distillation pretraining entry point for launchers: hands over to ``python -m pretrain.main``, the installed trainer.

    deepspeed [--num_gpus N] launch/pretrain.py --config configs/distilroberta.json [section.key=value ...]
    deepspeed --hostfile H launch/pretrain.py --config C ...           (multi-node, pdsh)
    deepspeed --hostfile H --no_ssh --node_rank R --master_addr A launch/pretrain.py --config C  (one launcher per node)
    torchrun --nproc_per_node N launch/pretrain.py --config C ...
    python launch/pretrain.py --config C ...                             (one process, no launcher)

Options, exit codes and signals are the trainer's (``pretrain/main.py``; ``python launch/pretrain.py --help``). The
installed equivalents: ``bert-distill-pretrain --config C`` (one process), ``torchrun ... -m pretrain.main``,
``deepspeed ... --module pretrain.main``. Needs the package installed (``make setup``, or ``pip install -e .``);
without it this prints what to do and exits 2.

How: ``os.execv`` of ``python -m pretrain.main`` with the same arguments (``launch/handover.py``). Python runs this
file with ``launch/`` first on ``sys.path``, so ``import pretrain`` here would import this file, not the package; the
exec avoids that without touching ``sys.path``, and keeps what the launchers rely on: the same pid (they signal and
wait for it), environment and ignored signals (the SLURM tasks ignore USR1 until the trainer's handler is installed),
and the interpreter's options (``-u`` from the DeepSpeed launcher). Process listings show ``python -m pretrain.main``.
"""

import sys

from handover import run_module  # launch/handover.py: launch/ is first on sys.path when Python runs this file

if __name__ == "__main__":
    sys.exit(run_module("pretrain.main"))
