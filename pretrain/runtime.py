"""The process a rank runs in: environment, allocator, distributed init, seeding, the stop flag, and errors that end
every rank together.

Preemption (docs/cluster.md): every rank installs :class:`StopFlag` for SIGTERM / SIGUSR1; the handler only records
the signal and the trainer acts on it at the next step boundary, when the ranks agree on it in one all-reduce.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.errors import DistillError

# The oldest torch the code runs on: torch.nn.utils.get_total_norm (the trainer's gradient norm) is new in 2.6.
MIN_TORCH = (2, 6)


class RunError(DistillError, RuntimeError):
    """A failure the user can act on, reported as one line (exit code 1): training diverged, a checkpoint could
    not be written, another rank failed, the installed torch is too old."""

    exit_code = 1


def console(msg: str) -> None:
    """One line to stdout, flushed (rank 0's progress lines)."""
    print(msg, flush=True)


def warn(msg: str) -> None:
    """One ``[pretrain] WARNING: ...`` line to stderr, flushed."""
    print(f"[pretrain] WARNING: {msg}", file=sys.stderr, flush=True)


def check_torch(version: str = torch.__version__) -> None:
    """Raise :class:`RunError` naming the installed and the required version when torch is older than
    :data:`MIN_TORCH` (so that the user sees it at start, not as an ``AttributeError`` mid-run)."""
    found = tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:2])
    if found < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise RunError(
            f"torch {version} is installed; this project needs torch >= {need} "
            f"(torch.nn.utils.get_total_norm); install a newer build (README, 'On GPUs')"
        )


def setup_environment() -> None:
    """Environment for this process, before DeepSpeed is imported.

    Without a launcher (``python launch/pretrain.py``): a one-rank world on 127.0.0.1 with a free port. Without CUDA:
    DeepSpeed's CPU accelerator. On CPU without ``OMP_NUM_THREADS``: torch threads = usable cores / local ranks.
    A ``TORCH_CUDA_ARCH_LIST`` with architecture suffixes is rewritten for DeepSpeed's op builder
    (:func:`deepspeed_arch_list`).
    """
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or ""
    readable = deepspeed_arch_list(arch)
    if readable != arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = readable
        if os.environ.get("RANK", "0") == "0":
            console(
                f"[pretrain] TORCH_CUDA_ARCH_LIST {arch!r} -> {readable!r} for DeepSpeed's op builder (it cannot "
                f"read architecture suffixes such as '9.0a')"
            )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        keep_freed_memory()
        if "OMP_NUM_THREADS" not in os.environ:
            local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // max(1, local)))


def deepspeed_arch_list(value: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` without architecture suffixes: ``"8.0;9.0a+PTX"`` -> ``"8.0;9.0+PTX"``.

    DeepSpeed 0.19's just-in-time op builder (fused Adam) sorts the entries as numbers and fails with
    ``ValueError: invalid literal for int() with base 10: '0a'`` on ``9.0a`` (PyTorch's name for Hopper's
    architecture-specific features; CUDA images set it). Its ops need no such features, so the plain architecture is
    used; seen on an H100 image whose list was ``9.0a`` (docs/performance.md).
    """
    return re.sub(r"(\d+\.\d+)[a-z]+", r"\1", value)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
KEEP_FREED_BYTES = 1 << 30


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, mmap_bytes)`` and ``mallopt(M_TRIM_THRESHOLD, trim_bytes)`` (bytes); returns
    False, changing nothing, without glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes)
        libc.mallopt(M_TRIM_THRESHOLD, trim_bytes)
    except (OSError, AttributeError):
        return False
    return True


def keep_freed_memory() -> None:
    """CPU: glibc keeps freed blocks up to 1 GiB for reuse (``mallopt`` M_MMAP_THRESHOLD and M_TRIM_THRESHOLD)
    instead of unmapping them, so the step's large activations are not page-faulted in anew every step (see
    docs/performance.md). Skipped when ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice) or without glibc."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        set_malloc_thresholds(KEEP_FREED_BYTES, KEEP_FREED_BYTES)


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed (NCCL on CUDA, gloo on CPU); returns (rank, world, device)."""
    setup_environment()
    import deepspeed
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (``numpy.random.SeedSequence``): e.g. (seed, rank) for per-rank dropout."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class StopFlag:
    """SIGTERM / SIGUSR1 handler that only records the signal; the loop acts on it at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> None:
        """Install the handler for SIGTERM and SIGUSR1 (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def describe(self) -> str:
        """The signal's name, or what stopped the ranks when this rank got none."""
        return signal.Signals(self.signum).name if self.signum else "a signal on another rank"

    def stopped_line(self, step: int) -> str:
        """The console line of a run stopped (checkpoint saved) after optimizer step ``step``."""
        return (
            f"[pretrain] stopped by {self.describe()} at step {step}: checkpoint saved; run the same command again to "
            f"resume"
        )


def all_ranks_ok(ok: bool, *, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank (collective: one all-reduce, MIN, of a flag on ``device``)."""
    import torch.distributed as dist

    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


class RankFailed(RunError):
    """Work that one rank did for all of them failed there; every rank raises this with that rank's message."""


def on_rank0(fn: Callable[[], Any], *, rank: int, expected: tuple[type[BaseException], ...] = ()) -> Any:
    """Run ``fn`` on rank 0 and broadcast its result to every rank (a collective: all ranks call it).

    Any exception on rank 0 reaches every rank, so none is left blocked in the broadcast: an ``expected`` exception
    type is re-raised on every rank as that type with rank 0's message; anything else as :class:`RankFailed` on the
    other ranks (rank 0 re-raises the original, with its traceback).
    """
    import torch.distributed as dist

    box: list[Any] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            box = [("ok", fn())]
        except Exception as e:
            error = e
            kind = next((t.__name__ for t in expected if isinstance(e, t)), None)
            box = [("error", kind, f"{type(e).__name__}: {e}" if kind is None else str(e))]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    status = box[0]
    if status[0] == "ok":
        return status[1]
    if error is not None:
        raise error
    same = next((t for t in expected if t.__name__ == status[1]), None)
    raise (same or RankFailed)(status[2] if same else f"rank 0 failed: {status[2]}")


def environment() -> dict[str, Any]:
    """This machine and its frameworks: ``cpu`` (model name from /proc/cpuinfo, else ``platform.processor()``),
    ``gpu`` (the first CUDA device's name, or None), ``gpus`` (visible CUDA devices), ``python``, ``torch``,
    ``transformers`` and ``deepspeed`` versions (None where not installed). Used for the run directory's
    ``environment.json`` (the training machine) and by the evaluation report (the evaluating machine)."""
    import importlib.metadata
    import platform

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "deepspeed": version("deepspeed"),
    }
