"""A real one-node SLURM cluster for the tests: install it (apt-get), configure it under a temporary directory, start
and stop its daemons.

The cluster is Debian's packages (``slurmctld``, ``slurmd``, ``slurm-client``, ``munge``) run with their own munge key,
``slurm.conf``, state, spool, pid and log files under one directory, on free TCP ports, so nothing in ``/etc`` is
used and a system SLURM (if any) is left alone. One node, named after this machine's short hostname, with ``CPUs=2``.
Client commands find the cluster through ``SLURM_CONF`` (see :attr:`SlurmCluster.env`), which jobs inherit.

Settings that differ from SLURM's defaults, and why:

- ``AuthInfo=cred_expire=5``: a requeued job waits ``cred_expire`` seconds (default 120) before it may start again.
- ``SchedulerParameters=sched_interval=2``: the main scheduling loop runs every 2 s (default 60), so a requeued job
  starts as soon as it is eligible.
- ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``: no cgroups (containers and CI machines rarely
  allow them). ``SlurmdParameters=config_overrides``: the node is not drained when the machine has other CPU counts.

Needs root (apt-get, and ``slurmd`` runs jobs as the submitting user). When the daemons cannot start,
:class:`ClusterError` says why; the pytest fixture turns that into a failure, never a skip.

Manual use (development)::

    python tests/slurm_cluster.py start /tmp/slurm-dev   # prints: export SLURM_CONF=/tmp/slurm-dev/slurm.conf
    python tests/slurm_cluster.py stop /tmp/slurm-dev
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel", "munged"]


class ClusterError(RuntimeError):
    """The test cluster could not be installed, started or used; the message says why and what was tried."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: missing)"
    return f"--- {path} (last {lines} lines) ---\n" + "\n".join(text[-lines:])


def missing_binaries() -> list[str]:
    """Names in :data:`BINARIES` that are not on PATH (``/usr/sbin`` included)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def ensure_installed(timeout_s: float = 600.0) -> None:
    """Install SLURM and munge with apt-get when any of :data:`BINARIES` is missing.

    Raises:
        ClusterError: not root, no apt-get, or the binaries are still missing after the install (with apt's output).
    """
    missing = missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterError(
            f"SLURM binaries {missing} are missing and installing them needs root "
            f"(run as root, or: apt-get install -y {' '.join(PACKAGES)})"
        )
    if shutil.which("apt-get") is None:
        raise ClusterError(
            f"SLURM binaries {missing} are missing and this machine has no apt-get; "
            f"install the packages {PACKAGES} (or your distribution's equivalent)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log = []
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        log.append(f"$ {shlex.join(cmd)} -> exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")
    # A package's post-install may fail to start a system service (no systemd here); what counts are the binaries.
    missing = missing_binaries()
    if missing:
        raise ClusterError(f"SLURM binaries {missing} still missing after apt-get:\n" + "\n".join(log))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlurmCluster:
    """A one-node SLURM cluster whose files all live under ``root``.

    Args:
        root: directory for the munge key, ``slurm.conf``, state, spool, pid and log files (created).
        cpus: CPUs the node offers (``CPUs=`` in slurm.conf).
        kill_wait_s: seconds between SIGTERM and SIGKILL when a job is cancelled or requeued (``KillWait``).
    """

    def __init__(self, root: str | os.PathLike, cpus: int = 2, kill_wait_s: int = 30):
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.kill_wait_s = kill_wait_s
        self.hostname = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        # munged wants every directory above its socket searchable by all (pytest's temporary directories are
        # private), and socket paths are limited to 107 bytes: the socket gets its own short directory in /tmp.
        self._socket_record = self.root / "run" / "munge-socket-path"

    @property
    def munge_socket(self) -> Path:
        """The munge socket (its directory, made by :meth:`start`, is recorded under ``root/run``)."""
        return Path(self._socket_record.read_text().strip())

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands and jobs: this process's, with ``SLURM_CONF`` pointing here."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _write_files(self) -> None:
        for sub, mode in (
            ("", 0o755),
            ("run", 0o755),
            ("munge", 0o700),
            ("state", 0o755),
            ("spool", 0o755),
            ("log", 0o755),
        ):
            d = self.root / sub
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(mode)
        if not self._socket_record.exists():
            sock_dir = Path(tempfile.mkdtemp(prefix="slurm-test-munge-", dir="/tmp"))
            sock_dir.chmod(0o755)
            self._socket_record.write_text(str(sock_dir / "munge.socket"))
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        r = self.root
        conf = f"""\
# One-node test cluster written by tests/slurm_cluster.py
ClusterName=bert-distill-test
SlurmctldHost={self.hostname}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
InactiveLimit=0
KillWait={self.kill_wait_s}
MinJobAge=600
NodeName={self.hostname} CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP
"""
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(conf)
        tmp.replace(self.conf)

    def _diagnostics(self) -> str:
        return "\n".join(_tail(self.log_dir / n) for n in ("munged.log", "slurmctld.log", "slurmd.log"))

    def _start_daemon(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise ClusterError(
                f"`{shlex.join(cmd)}` exited {proc.returncode}: {proc.stdout}{proc.stderr}\n" + self._diagnostics()
            )

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        """Install if needed, write the files, start munged, slurmctld and slurmd; return when the node is idle.

        Raises:
            ClusterError: a daemon failed to start or the node did not become idle within ``timeout_s`` seconds;
                the message carries the daemons' log tails.
        """
        ensure_installed()
        try:
            socket.gethostbyname(self.hostname)
        except OSError as e:
            raise ClusterError(
                f"this machine's hostname {self.hostname!r} does not resolve ({e}); jobs use it as "
                f"MASTER_ADDR. Add it to /etc/hosts."
            ) from e
        self._write_files()
        r = self.root
        self._start_daemon(
            [
                "munged",
                f"--key-file={r}/munge/munge.key",
                f"--socket={self.munge_socket}",
                f"--pid-file={r}/run/munged.pid",
                f"--seed-file={r}/munge/munged.seed",
                f"--log-file={self.log_dir}/munged.log",
            ]
        )
        self._start_daemon(["slurmctld", "-f", str(self.conf)])
        self._start_daemon(["slurmd", "-f", str(self.conf)])
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            proc = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False)
            state = proc.stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.5)
        node = self.run(["scontrol", "show", "node", self.hostname], check=False)
        raise ClusterError(
            f"node {self.hostname} did not become idle within {timeout_s:.0f} s "
            f"(sinfo state {state!r}):\n{node.stdout}{node.stderr}\n" + self._diagnostics()
        )

    # ---- use ------------------------------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a client command (``sbatch``, ``squeue``, ...) against this cluster; text output captured.

        Raises:
            ClusterError: ``check`` and a non-zero exit (with the command's output).
        """
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"`{shlex.join(cmd)}` exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ...); {} when unknown."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if proc.returncode != 0:
            return {}
        out = {}
        for item in proc.stdout.split():
            key, _, value = item.partition("=")
            out.setdefault(key, value)
        return out

    def wait_for(
        self, job_id: str | int, states: set[str], timeout_s: float, restarts: int | None = None
    ) -> dict[str, str]:
        """Poll until the job's ``JobState`` is in ``states`` (and ``Restarts`` equals ``restarts`` when given).

        Returns the job's record. Raises :class:`ClusterError` after ``timeout_s`` seconds, with the record.
        """
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states and (restarts is None or info.get("Restarts") == str(restarts)):
                return info
            time.sleep(0.5)
        raise ClusterError(
            f"job {job_id} not in {sorted(states)} (restarts={restarts}) after {timeout_s:.0f} s: {info}"
        )

    # ---- tear-down ------------------------------------------------------------------------------------------
    def _pid(self, name: str) -> int | None:
        try:
            return int((self.root / "run" / name).read_text().strip())
        except (OSError, ValueError):
            return None

    def _jobs(self) -> list[str]:
        return self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()

    def stop(self, timeout_s: float = 45.0) -> None:
        """Cancel every job, shut down slurmctld and slurmd, stop munged. Kills (by pid file) what did not exit."""
        if self.conf.exists() and self._pid("slurmctld.pid"):
            jobs = self._jobs()
            if jobs:
                self.run(["scancel", "--full", *jobs], check=False)
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline and self._jobs():
                    time.sleep(0.5)
            self.run(["scontrol", "shutdown"], check=False)
        pids = [p for p in (self._pid("slurmctld.pid"), self._pid("slurmd.pid")) if p]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.2)
        munged = self._pid("munged.pid")
        for pid in [p for p in pids if _pid_alive(p)] + ([munged] if munged else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids + ([munged] if munged else [])):
            time.sleep(0.2)
        for pid in pids + ([munged] if munged else []):
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self._socket_record.exists():
            shutil.rmtree(self.munge_socket.parent, ignore_errors=True)
            self._socket_record.unlink()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/slurm_cluster.py start|stop DIR", file=sys.stderr)
        return 2
    cluster = SlurmCluster(argv[1])
    if argv[0] == "start":
        try:
            cluster.start()
        except ClusterError as e:
            print(f"error: {e}", file=sys.stderr)
            cluster.stop()
            return 1
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
