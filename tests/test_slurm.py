"""launch/slurm.py: node lists, hostfiles, the batch script, bad input (fast, no daemons); and on a real one-node
SLURM cluster (tests/slurm_cluster.py, marked ``slurm`` and ``slow``): a submitted tiny run finishes with checkpoint
and export, and a signalled run checkpoints, requeues and resumes with continuous steps.
"""
from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny-cpu.json"


def _load_slurm():
    spec = importlib.util.spec_from_file_location("launch_slurm", REPO / "launch" / "slurm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


slurm = _load_slurm()


# ---- node lists and hostfiles -----------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu5", ["gpu5"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("x[009-011]", ["x009", "x010", "x011"]),
    ("r[1-2]-n[3-4]", ["r1-n3", "r1-n4", "r2-n3", "r2-n4"]),
    ("a[1,3],b[2-3]c", ["a1", "a3", "b2c", "b3c"]),
    ("rack1-n[1-2],login", ["rack1-n1", "rack1-n2", "login"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert slurm.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, message", [
    ("", "empty"), ("n[1-3", "unbalanced"), ("n1-3]", "unbalanced"), ("n[3-1]", "backwards"),
    ("n[a-b]", "bad range"), ("n[1-]", "bad range"), ("n[1]],m", "unbalanced"), ("a,,b", "empty item"),
])
def test_expand_nodelist_rejects(nodelist, message):
    with pytest.raises(ValueError, match=message):
        slurm.expand_nodelist(nodelist)


def test_hostfile_from_slurm_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08],big1")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
    out = tmp_path / "hostfile"
    assert slurm.main(["hostfile", "-o", str(out)]) == 0
    assert out.read_text() == "gpu07 slots=8\ngpu08 slots=8\nbig1 slots=8\n"
    assert slurm.main(["hostfile", "--nodelist", "n[1-2]", "--slots", "4"]) == 0
    assert capsys.readouterr().out == "n1 slots=4\nn2 slots=4\n"


def test_hostfile_bad_input(monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    assert slurm.main(["hostfile", "--slots", "2"]) == 1
    assert "SLURM_JOB_NODELIST" in capsys.readouterr().err
    assert slurm.main(["hostfile", "--nodelist", "n[1-2]"]) == 1
    assert "--slots" in capsys.readouterr().err
    assert slurm.main(["hostfile", "--nodelist", "n[2-1]", "--slots", "2"]) == 1
    assert "backwards" in capsys.readouterr().err


# ---- submit: the batch script and bad input ---------------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A submit directory with a stand-in shard folder (submit only checks its manifest exists) and no sbatch."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # no sbatch / squeue / scontrol unless a test adds them
    return tmp_path


def _fake_sbatch(bin_dir: Path, job_id: str = "4242") -> Path:
    """An sbatch that records its arguments in bin/sbatch.args and prints ``job_id`` (as ``--parsable`` does)."""
    path = bin_dir / "sbatch"
    path.write_text(f'#!/bin/sh\necho "$@" > "{bin_dir}/sbatch.args"\necho "{job_id};cluster"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _submit_args(*extra: str, nodes: str = "1", gpus: str = "2") -> list[str]:
    return ["submit", "--config", str(TINY_CONFIG), "--nodes", nodes, "--gpus-per-node", gpus,
            "data.dir=shards", "train.output_dir=runs/r1", *extra]


def test_dry_run_prints_a_valid_script_and_writes_nothing(workdir, capsys):
    assert slurm.main(_submit_args("--partition", "gpu", "--time", "1-00:00:00", "--account", "proj",
                                   "--cpus-per-task", "8", "--nodes", "4", "--gpus-per-node", "8", "--dry-run",
                                   "deepspeed.train_batch_size=256")) == 0
    script = capsys.readouterr().out
    run_dir = workdir / "runs" / "r1"
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gres=gpu:8",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --signal=B:USR1@120", f"#SBATCH --output={run_dir}/slurm/%j.log",
                 f"#SBATCH --chdir={workdir}", f"RUN_DIR={run_dir}", "RANKS_PER_NODE=8"]:
        assert line in script.splitlines(), line
    # the ranks run the trainer with the submitted config and overrides, through the srun line
    assert (f"TRAIN_CMD=({sys.executable} {REPO}/launch/pretrain.py --config {TINY_CONFIG} data.dir=shards "
            f"train.output_dir=runs/r1 deepspeed.train_batch_size=256)") in script
    assert "srun --nodes=" in script and "exec \"$@\"' rank \"${TRAIN_CMD[@]}\"" in script
    assert "SRUN_ARGS=(--cpus-per-task=8)" in script
    syntax = subprocess.run(["/bin/bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    assert not (workdir / "runs").exists()


def test_dry_run_cpu_ranks_request_no_gpus(workdir, capsys):
    assert slurm.main(_submit_args("--gres", "none", "--sbatch-arg=--qos=low", "--srun-arg=--mpi=none",
                                   "--dry-run")) == 0
    script = capsys.readouterr().out
    assert "--gres" not in script
    assert "#SBATCH --qos=low" in script.splitlines()
    assert "SRUN_ARGS=(--mpi=none)" in script


def test_submit_writes_the_script_and_prints_the_job_id(workdir, capsys):
    _fake_sbatch(workdir / "bin")
    assert slurm.main(_submit_args("--gres", "none")) == 0
    out = capsys.readouterr()
    assert out.out == "4242\n"
    script = workdir / "runs" / "r1" / "slurm" / "job.sbatch"
    assert (workdir / "bin" / "sbatch.args").read_text().split() == ["--parsable", str(script)]
    assert script.read_text().startswith("#!/bin/bash\n") and os.access(script, os.X_OK)
    assert "4242" in out.err and str(script) in out.err


@pytest.mark.parametrize("option, value", [("--nodes", "0"), ("--nodes", "-2"), ("--gpus-per-node", "0"),
                                           ("--gpus-per-node", "two")])
def test_submit_rejects_non_positive_counts(workdir, capsys, option, value):
    _fake_sbatch(workdir / "bin")
    with pytest.raises(SystemExit) as e:
        slurm.main(["submit", "--config", str(TINY_CONFIG), "--nodes", "1", "--gpus-per-node", "1", option, value])
    assert e.value.code == 2
    assert option in capsys.readouterr().err
    assert not (workdir / "bin" / "sbatch.args").exists()


def _assert_refused(workdir, capsys, argv, *fragments):
    _fake_sbatch(workdir / "bin")
    assert slurm.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not (workdir / "bin" / "sbatch.args").exists(), "nothing may be submitted"
    assert not (workdir / "runs" / "r1" / "slurm").exists(), "no script may be written"


def test_submit_refuses_an_invalid_config(workdir, capsys):
    _assert_refused(workdir, capsys, _submit_args("train.bogus=1"), "tiny-cpu.json", "bogus")
    _assert_refused(workdir, capsys, _submit_args("loss.temperature=-1"), "loss.temperature")


def test_submit_refuses_a_batch_size_the_world_size_cannot_hold(workdir, capsys):
    # tiny-cpu: 8 sequences per step, micro-batch 2 -> 3 nodes x 1 rank cannot divide it
    _assert_refused(workdir, capsys, _submit_args("--gres", "none", nodes="3", gpus="1"),
                    "world size 3", "train_batch_size")


def test_submit_refuses_missing_shards(workdir, capsys):
    _assert_refused(workdir, capsys, _submit_args("data.dir=nowhere"), "data.dir", "manifest.json")


def test_submit_without_sbatch_suggests_dry_run(workdir, capsys):
    assert slurm.main(_submit_args()) == 1
    err = capsys.readouterr().err
    assert "sbatch not found" in err and "--dry-run" in err
    assert not (workdir / "runs").exists()


def _fake_run_dir(workdir: Path, overrides: list[str]) -> Path:
    """A run directory holding a checkpoint of the run configured by ``overrides`` (config.json as the trainer
    writes it: the resolved config)."""
    from pretrain.config import load
    run_dir = workdir / "runs" / "r1"
    (run_dir / "checkpoints" / "global_step4").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("global_step4")
    (run_dir / "config.json").write_text(json.dumps(load(TINY_CONFIG, overrides).to_dict()))
    return run_dir


def test_submit_refuses_another_runs_checkpoints(workdir, capsys):
    _fake_run_dir(workdir, ["data.dir=shards", "train.output_dir=runs/r1", "loss.alpha_ce=1.0"])
    _assert_refused(workdir, capsys, _submit_args(), "holds checkpoints of another run", "loss.alpha_ce",
                    "train.output_dir")


def test_submit_resumes_the_same_run(workdir, capsys):
    _fake_run_dir(workdir, ["data.dir=shards", "train.output_dir=runs/r1"])
    _fake_sbatch(workdir / "bin")
    # a longer schedule and other intervals are the same run, resumed
    assert slurm.main(_submit_args("--gres", "none", "train.max_steps=16", "train.log_interval=2")) == 0
    assert capsys.readouterr().out == "4242\n"


def test_submit_refuses_checkpoints_without_config(workdir, capsys):
    (workdir / "runs" / "r1" / "checkpoints" / "global_step1").mkdir(parents=True)
    _assert_refused(workdir, capsys, _submit_args(), "no readable config.json")
