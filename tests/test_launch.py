"""The installed commands, and the ``launch/`` wrappers that hand over to them (``launch/handover.py``): the same
process becomes ``python -m pretrain.main`` with its pid, arguments, interpreter options and ignored signals, and a
missing installation is one clear error (exit 2)."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

COMMANDS = {
    "bert-distill-pretrain": "pretrain.main:main",
    "bert-distill-slurm": "pretrain.slurm:main",
    "bert-distill-data": "data_prep.__main__:main",
    "bert-distill-config": "pretrain.config:main",
    "bert-distill-export": "pretrain.export:main",
    "bert-distill-evaluate": "pretrain.evaluate:main",
    "bert-distill-downstream": "pretrain.downstream:main",
    "bert-distill-taskmode": "pretrain.taskmode:main",
    "bert-distill-deploy": "pretrain.deploy.cli:main",
}


def test_installed_commands():
    eps = {
        ep.name: ep
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.name.startswith("bert-distill-")
    }
    assert {name: ep.value for name, ep in eps.items()} == COMMANDS, "run `make setup` after editing pyproject.toml"
    for ep in eps.values():
        assert callable(ep.load())
    proc = subprocess.run(
        [str(Path(PY).parent / "bert-distill-pretrain"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: bert-distill-pretrain "), proc.stderr


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def _ignored(pid: int) -> int:
    """The process's set of ignored signals (``SigIgn`` of /proc/PID/status) as a bit mask."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigIgn")


def test_wrapper_becomes_the_trainer_in_the_same_process(tmp_path):
    """As a SLURM task starts a rank: USR1 ignored, then exec of ``python -u launch/pretrain.py``. The config is a
    FIFO, so the trainer waits in its first read while the test looks at the process."""
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [
            "/bin/bash",
            "-c",
            'trap "" USR1; exec "$@"',
            "rank",
            PY,
            "-u",
            "launch/pretrain.py",
            "--config",
            str(fifo),
            "train.max_steps=3",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "pretrain.main" not in _cmdline(proc.pid):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, _cmdline(proc.pid)
            time.sleep(0.02)
        cmd = _cmdline(proc.pid)  # the same pid runs the trainer module, with -u and the same arguments
        assert cmd[0] == PY and "-u" in cmd[: cmd.index("-m")], cmd
        assert cmd[cmd.index("-m") :] == ["-m", "pretrain.main", "--config", str(fifo), "train.max_steps=3"], cmd
        assert _ignored(proc.pid) & (1 << (signal.SIGUSR1 - 1)), "USR1 must stay ignored across the exec"
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.2)
        assert proc.poll() is None, "an ignored USR1 does not end the rank"
        with open(fifo, "w") as f:  # unblocks the trainer's read: a config error, exit 2
            f.write("{")
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2 and "invalid JSON" in err, err


def test_wrappers_without_the_package_say_what_to_do():
    for script in ("launch/pretrain.py", "launch/slurm.py"):
        # -S: no site-packages, as for an interpreter where the package was never installed
        proc = subprocess.run([PY, "-S", script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (script, proc.stdout, proc.stderr)
        assert (
            proc.stderr.startswith("error: the bert-distill package is not installed")
            and "make setup" in proc.stderr
            and "pip install -e ." in proc.stderr
        ), proc.stderr


def test_wrapper_refuses_a_working_directory_that_hides_the_package():
    proc = subprocess.run(
        [PY, "pretrain.py", "--help"], cwd=REPO / "launch", capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "would hide the pretrain package" in proc.stderr, proc.stderr


def test_slurm_wrapper_runs_the_module():
    proc = subprocess.run(
        [PY, "launch/slurm.py", "hostfile", "--nodelist", "n[1-2]", "--slots", "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout) == (0, "n1 slots=4\nn2 slots=4\n"), proc.stderr
    proc = subprocess.run(
        [PY, "launch/slurm.py", "hostfile", "--nodelist", "n[2-1]", "--slots", "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "backwards" in proc.stderr, proc.stderr
