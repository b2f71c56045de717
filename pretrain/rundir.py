"""The run directory's single owner: its layout, the rule that says whether it holds the same run, and its lock.

Layout of ``train.output_dir`` (every other module asks :class:`RunDir` for these paths)::

    config.json        the resolved config of the last start
    metrics.jsonl      one JSON record per logged step / evaluation (rank 0)
    tensorboard/       the same as TensorBoard scalars
    checkpoints/       step_XXXXXXXX/ tags and ``latest`` (pretrain.checkpoint)
    student_init/      the student before training (Hugging Face directory)
    student/           the final student (Hugging Face directory, with distill_export.json naming its checkpoint)
    slurm/             the batch script and logs of launch/slurm.py
    .lock              held (``flock``) by rank 0 of the live run; names its host, pid and start time

Identity (:func:`identity_differences`): a directory holds *the same run* when its checkpoint's config has the same
values for the keys the checkpoint's tensors depend on: ``teacher.name_or_path``, ``teacher.revision`` and every
``student`` key, and in task distillation ``task.name``, ``task.student`` and ``task.head`` (a key the checkpoint's
config lacks, added to the project since, is not compared). Everything else (``teacher.dtype``, a longer schedule,
other intervals, loss weights) may change between starts of one run. The trainer and ``pretrain.slurm submit``
both apply this rule.

``python -m pretrain.rundir finished RUN`` exits 0 when RUN's latest checkpoint is exported to ``student/`` (the run
is done), 1 otherwise; the SLURM batch script asks it before requeueing.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from data_prep.errors import DiskFullError, DistillError
from data_prep.files import atomic_write_text

IDENTITY_KEYS = (
    ("teacher", "name_or_path"),
    ("teacher", "revision"),
    ("student", "*"),
    ("task", "name"),
    ("task", "student"),
    ("task", "head"),
)
EXPORT_INFO = "distill_export.json"


class RunLocked(DistillError, RuntimeError):
    """Another live process holds the run directory; the message names it (host, pid, start time)."""

    exit_code = 1


def identity_differences(saved: dict | None, mine: dict) -> list[str]:
    """The identity keys (``section.key: old -> new``) whose values differ between a checkpoint's resolved config
    ``saved`` and this run's ``mine`` (both ``RunConfig.to_dict()`` dicts); empty when they hold the same run."""
    saved = saved or {}
    out = []
    for section, key in IDENTITY_KEYS:
        old, new = saved.get(section) or {}, mine.get(section) or {}
        # a key the saved config lacks was added to the project after that checkpoint was written: not a difference
        keys = sorted(k for k in set(old) | set(new) if k in old) if key == "*" else [key]
        out += [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return out


LATEST = "latest"


def latest_tag_in(checkpoints: str | os.PathLike) -> str | None:
    """The tag named by ``<checkpoints>/latest`` (None when there is none), for a run's ``checkpoints/`` folder."""
    try:
        return (Path(checkpoints) / LATEST).read_text().strip() or None
    except FileNotFoundError:
        return None


class RunDir:
    """Paths of one run directory (see the module docstring) and the checks on it.

    Args:
        root: ``train.output_dir``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    checkpoints = property(lambda self: self.root / "checkpoints", doc="``checkpoints/`` (tags and ``latest``)")
    latest_file = property(lambda self: self.checkpoints / LATEST, doc="``checkpoints/latest``: the newest tag")
    config_file = property(lambda self: self.root / "config.json")
    environment_file = property(
        lambda self: self.root / "environment.json", doc="``environment.json``: the machine of each start"
    )
    metrics_file = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    student = property(lambda self: self.root / "student", doc="the final export")
    student_init = property(lambda self: self.root / "student_init", doc="the export before training")
    slurm = property(lambda self: self.root / "slurm")
    lock_file = property(lambda self: self.root / ".lock")

    def latest_tag(self) -> str | None:
        """The tag named by ``checkpoints/latest`` (None when there is none)."""
        return latest_tag_in(self.checkpoints)

    def exported_checkpoint(self, folder: Path | None = None) -> str | None:
        """The checkpoint directory an export (default ``student/``) was made from, from its ``distill_export.json``;
        None when there is no such export or it names none."""
        info = Path(folder or self.student) / EXPORT_INFO
        try:
            return json.loads(info.read_text()).get("checkpoint")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def finished(self) -> bool:
        """Whether ``student/`` is the export of the latest checkpoint (the run is done)."""
        tag, exported = self.latest_tag(), self.exported_checkpoint()
        return bool(tag and exported and Path(exported).name == tag)

    def check_same_run(
        self, manifest: dict[str, Any], mine: dict, world_size: int, allow_world_size_change: bool
    ) -> None:
        """Raise ``ValueError`` when the checkpoint whose ``checkpoint.json`` is ``manifest`` cannot be resumed by a
        run of config ``mine`` (``RunConfig.to_dict()``) on ``world_size`` ranks: another run's identity keys (the
        message names them), or another world size unless ``allow_world_size_change``. The message says what to do;
        callers prefix the key or option they report under."""
        diffs = identity_differences(manifest.get("config"), mine)
        where = self.checkpoints / str(manifest.get("tag", "?"))
        if diffs:
            shown = "; ".join(diffs[:5]) + (f"; ... ({len(diffs)} differences)" if len(diffs) > 5 else "")
            raise ValueError(
                f"{self.root} holds checkpoints of another run ({where.name}: {shown}); use another "
                f"train.output_dir to start a new run, or the original values to resume it"
            )
        saved_ws = manifest.get("world_size")
        if saved_ws is not None and saved_ws != world_size and not allow_world_size_change:
            raise ValueError(
                f"checkpoint {where} was written by {saved_ws} rank(s), this run has {world_size}; run "
                f"with {saved_ws} rank(s), or set train.allow_world_size_change=true to resume with "
                f"another layout (see docs/cluster.md, 'Changing the number of ranks')"
            )

    # -- the lock ----------------------------------------------------------------------------------------------

    def lock(self) -> RunLock:
        """Take the run directory's lock (rank 0, for the life of the process). Raises :class:`RunLocked`."""
        return RunLock(self.lock_file)


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock``, held until :meth:`release` or the process ends.

    The kernel drops the lock when its process dies (a crash, SIGKILL, a preempted node), so a lock file left behind
    never blocks the next run; on NFS (v4, or v3 with lockd) and Lustre mounted with ``flock`` the lock is seen by
    every node. The file holds the holder's host, pid, start time and SLURM job id, for the refusal message. On a
    file system without lock support the run goes on with a warning (nothing can be checked there).

    Raises:
        RunLocked: another live process holds the lock.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = self._holder()
                os.close(self.fd)
                self.fd = None
                raise RunLocked(
                    f"{self.path.parent} is in use by a live run ({holder}); wait for it to end, stop "
                    f"it (SIGTERM or SIGUSR1 saves a checkpoint), or choose another train.output_dir"
                ) from None
            print(
                f"[pretrain] WARNING: {self.path}: the file system does not support locks ({e.strerror}); a "
                f"second run on this directory cannot be detected",
                file=sys.stderr,
                flush=True,
            )
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def _holder(self) -> str:
        if self.fd is None:
            return "holder unknown"
        try:
            info = json.loads(os.pread(self.fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "holder unknown"
        job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
        return f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')}{job}"

    def release(self) -> None:
        """Release the lock (the file stays: removing it could race with the next holder)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_config(run: RunDir, resolved: dict) -> list[str] | None:
    """Write ``config.json`` (atomically); returns the changed ``section.key`` names when an older one differed,
    else None. A full disk raises :class:`pretrain.runtime.RunError` (one line, exit 1; the old file is kept)."""
    new = json.dumps(resolved, indent=2) + "\n"
    old_text = run.config_file.read_text() if run.config_file.is_file() else None
    try:
        atomic_write_text(run.config_file, new, what="run config")
    except DiskFullError as e:
        from pretrain.runtime import RunError

        raise RunError(str(e)) from e
    if old_text is None or old_text == new:
        return None
    before = json.loads(old_text)
    return [
        f"{s}.{k}"
        for s in resolved
        if isinstance(resolved[s], dict)
        for k in resolved[s]
        if (before.get(s) or {}).get(k) != resolved[s][k]
    ]


def record_start(run: RunDir, start: dict) -> None:
    """Append ``start`` (the machine, ranks and step of this start of the run: :func:`pretrain.runtime.environment`
    plus ``world_size``, ``step``, ``time``) to ``environment.json``'s ``starts`` (written atomically; an unreadable
    older file is started anew). A full disk raises :class:`pretrain.runtime.RunError`."""
    try:
        starts = json.loads(run.environment_file.read_text()).get("starts", [])
    except (OSError, ValueError, AttributeError):
        starts = []
    try:
        atomic_write_text(
            run.environment_file, json.dumps({"starts": [*starts, start]}, indent=1) + "\n", what="run environment"
        )
    except DiskFullError as e:
        from pretrain.runtime import RunError

        raise RunError(str(e)) from e


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.rundir finished RUN``: exit 0 when the run is finished (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "finished":
        print("usage: python -m pretrain.rundir finished RUN_DIR", file=sys.stderr)
        return 2
    return 0 if RunDir(argv[1]).finished() else 1


if __name__ == "__main__":
    sys.exit(main())
