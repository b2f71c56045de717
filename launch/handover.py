"""Hand a ``launch/`` script over to a module of the installed package: ``os.execv`` of ``python -m MODULE ARGS``.

Used by ``launch/pretrain.py`` (-> ``pretrain.main``) and ``launch/slurm.py`` (-> ``pretrain.slurm``); Python runs
them with ``launch/`` first on ``sys.path``, which is how they find this file.

Why ``execv`` and not an import: with ``launch/`` first on ``sys.path``, ``import pretrain`` would import
``launch/pretrain.py`` itself, not the package. Editing ``sys.path`` is what these wrappers must not do, and loading
the package by hand from another path entry would only fix this process: a worker that multiprocessing starts with
"spawn" or "forkserver" re-imports the main module with the same ``sys.path`` and meets the same shadowing. A child
process (``subprocess``) would put a second process between the launcher and the trainer, while the launchers
(deepspeed, torchrun, SLURM's srun) signal and wait for the pid they started. ``execv`` replaces this interpreter by
``python -m MODULE`` in the same process: the same pid, environment, working directory, open files and ignored signals
(the SLURM batch script ignores USR1 in each task until the trainer installs its handler; an ignored signal stays
ignored across exec; handled ones return to their defaults, as in any new interpreter). The interpreter's options are
passed on (``-u``, which the DeepSpeed launcher gives, ``-X``, ``-W``, ...). The cost is one more interpreter start,
about 50 ms. ``-m`` puts the working directory first on ``sys.path``, as any ``python -m`` does: run from a checkout's
root, that checkout's code is the one used. Process listings show ``python -m MODULE`` instead of the script.
"""

import importlib.machinery
import importlib.metadata
import os
import subprocess
import sys

DISTRIBUTION = "bert-distill"


def interpreter_flags() -> list[str]:
    """This interpreter's options as command-line flags (``-X``, ``-W``, ``-E``, ...), as multiprocessing passes them
    to its children: CPython's ``subprocess._args_from_interpreter_flags`` (private, no public equivalent); none on an
    interpreter without it."""
    flags = getattr(subprocess, "_args_from_interpreter_flags", None)
    return list(flags()) if callable(flags) else []


def command(module: str, argv: list[str]) -> list[str]:
    """The argv that runs ``python -m module argv`` with this interpreter and its options."""
    flags = interpreter_flags()
    if getattr(sys.stdout, "write_through", False) and "-u" not in flags:  # -u (or PYTHONUNBUFFERED) is not a flag
        flags.append("-u")
    return [sys.executable, *flags, "-m", module, *argv]


def problem(module: str) -> str | None:
    """Why ``python -m module`` cannot start from here (the message says what to do), or None."""
    try:
        importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return (
            f"the {DISTRIBUTION} package is not installed for {sys.executable}: run `make setup` (a .venv with "
            f"everything), or `{sys.executable} -m pip install -e .` in the repository root"
        )
    if getattr(sys.flags, "safe_path", False):  # -P (Python >= 3.11): the working directory is not searched
        return None
    package = module.split(".")[0]
    spec = importlib.machinery.PathFinder.find_spec(package, [os.getcwd()])  # finds, imports nothing
    if spec is not None and spec.submodule_search_locations is None:
        return (
            f"{spec.origin} in the working directory would hide the {package} package from `python -m "
            f"{module}`; run the command from another directory (the repository root)"
        )
    return None


def run_module(module: str, argv: list[str] | None = None) -> int:
    """Become ``python -m module argv`` (default: this script's arguments); returns 2 with ``error: ...`` on stderr
    when that cannot start (the package is not installed), else does not return."""
    why = problem(module)
    if why:
        print(f"error: {why}", file=sys.stderr, flush=True)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    args = command(module, sys.argv[1:] if argv is None else argv)
    os.execv(args[0], args)
    return 0  # not reached
