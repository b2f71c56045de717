#!/usr/bin/env python
"""SLURM submission and hostfiles: hands over to ``python -m pretrain.slurm`` (installed as ``bert-distill-slurm``).

    python launch/slurm.py submit --config C --nodes N --gpus-per-node G [--partition P] [--time T] [--account A]
                                  [--dry-run] [section.key=value ...]
    python launch/slurm.py hostfile [--nodelist LIST] [--slots G] [-o hostfile]

Options and behaviour: ``pretrain/slurm.py`` and docs/cluster.md. Needs the package installed (``make setup``, or
``pip install -e .``); without it this prints what to do and exits 2. Why an ``os.execv`` rather than an import:
``launch/handover.py`` (``launch/`` is first on ``sys.path`` here, so ``import pretrain`` would find
``launch/pretrain.py``).
"""

import sys

from handover import run_module  # launch/handover.py: launch/ is first on sys.path when Python runs this file

if __name__ == "__main__":
    sys.exit(run_module("pretrain.slurm"))
