"""pretrain.slurm (``launch/slurm.py``, ``bert-distill-slurm``): node lists, hostfiles, the batch script, bad input
(fast, no daemons); and on a real one-node SLURM cluster (tests/slurm_cluster.py, marked ``slurm`` and ``slow``): a
submitted tiny run finishes with checkpoint and export, and a signalled run checkpoints, requeues and resumes with
continuous steps.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import slurm

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny-cpu.json"


# ---- node lists and hostfiles -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu5", ["gpu5"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("x[009-011]", ["x009", "x010", "x011"]),
        ("r[1-2]-n[3-4]", ["r1-n3", "r1-n4", "r2-n3", "r2-n4"]),
        ("a[1,3],b[2-3]c", ["a1", "a3", "b2c", "b3c"]),
        ("rack1-n[1-2],login", ["rack1-n1", "rack1-n2", "login"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert slurm.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, message",
    [
        ("", "empty"),
        ("n[1-3", "unbalanced"),
        ("n1-3]", "unbalanced"),
        ("n[3-1]", "backwards"),
        ("n[a-b]", "bad range"),
        ("n[1-]", "bad range"),
        ("n[1]],m", "unbalanced"),
        ("a,,b", "empty item"),
    ],
)
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
    assert slurm.main(["hostfile", "--slots", "2"]) == 2
    assert "SLURM_JOB_NODELIST" in capsys.readouterr().err
    assert slurm.main(["hostfile", "--nodelist", "n[1-2]"]) == 2
    assert "--slots" in capsys.readouterr().err
    assert slurm.main(["hostfile", "--nodelist", "n[2-1]", "--slots", "2"]) == 2
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
    return [
        "submit",
        "--config",
        str(TINY_CONFIG),
        "--nodes",
        nodes,
        "--gpus-per-node",
        gpus,
        "data.dir=shards",
        "train.output_dir=runs/r1",
        *extra,
    ]


def test_dry_run_prints_a_valid_script_and_writes_nothing(workdir, capsys):
    assert (
        slurm.main(
            _submit_args(
                "--partition",
                "gpu",
                "--time",
                "1-00:00:00",
                "--account",
                "proj",
                "--cpus-per-task",
                "8",
                "--nodes",
                "4",
                "--gpus-per-node",
                "8",
                "--dry-run",
                "deepspeed.train_batch_size=256",
            )
        )
        == 0
    )
    script = capsys.readouterr().out
    run_dir = workdir / "runs" / "r1"
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@120",
        f"#SBATCH --output={run_dir}/slurm/%j.log",
        f"#SBATCH --chdir={workdir}",
        f"RUN_DIR={run_dir}",
        "RANKS_PER_NODE=8",
    ]:
        assert line in script.splitlines(), line
    # the ranks run the installed trainer module with the submitted config and overrides, through the srun line
    assert f"PYTHON={sys.executable}" in script.splitlines()
    assert (
        f'TRAIN_CMD=("$PYTHON" -m pretrain.main --config {TINY_CONFIG} data.dir=shards '
        f"train.output_dir=runs/r1 deepspeed.train_batch_size=256)"
    ) in script.splitlines()
    assert f"LOG_DIR={run_dir}/slurm" in script.splitlines() and '--output="$LOG_DIR/%j-node%n.log"' in script
    assert '"$PYTHON" -m pretrain.rundir finished "$RUN_DIR"' in script
    assert "srun --nodes=" in script and 'exec "$@"\' rank "${TRAIN_CMD[@]}"' in script
    assert "SRUN_ARGS=(--cpus-per-task=8 --gpu-bind=none)" in script
    syntax = subprocess.run(["/bin/bash", "-n"], input=script, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr
    assert not (workdir / "runs").exists()


def test_dry_run_cpu_ranks_request_no_gpus(workdir, capsys):
    assert (
        slurm.main(_submit_args("--gres", "none", "--sbatch-arg=--qos=low", "--srun-arg=--mpi=none", "--dry-run")) == 0
    )
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


@pytest.mark.parametrize(
    "option, value", [("--nodes", "0"), ("--nodes", "-2"), ("--gpus-per-node", "0"), ("--gpus-per-node", "two")]
)
def test_submit_rejects_non_positive_counts(workdir, capsys, option, value):
    _fake_sbatch(workdir / "bin")
    with pytest.raises(SystemExit) as e:
        slurm.main(["submit", "--config", str(TINY_CONFIG), "--nodes", "1", "--gpus-per-node", "1", option, value])
    assert e.value.code == 2
    assert option in capsys.readouterr().err
    assert not (workdir / "bin" / "sbatch.args").exists()


def _assert_refused(workdir, capsys, argv, *fragments):
    _fake_sbatch(workdir / "bin")
    assert slurm.main(argv) == 2
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
    _assert_refused(
        workdir, capsys, _submit_args("--gres", "none", nodes="3", gpus="1"), "world size 3", "train_batch_size"
    )


def test_dry_run_of_a_task_distillation_run(workdir, capsys):
    """A task run (configs/task-demo.json: labeled examples, no shards) submits like a pretraining run."""
    config = REPO / "configs" / "task-demo.json"
    assert (
        slurm.main(
            [
                "submit",
                "--config",
                str(config),
                "--nodes",
                "1",
                "--gpus-per-node",
                "2",
                "--gres",
                "none",
                "--dry-run",
                "train.output_dir=runs/task",
            ]
        )
        == 0
    )
    script = capsys.readouterr().out
    assert f'TRAIN_CMD=("$PYTHON" -m pretrain.main --config {config} train.output_dir=runs/task)' in script
    assert not (workdir / "runs").exists()


def test_submit_refuses_missing_shards(workdir, capsys):
    _assert_refused(workdir, capsys, _submit_args("data.dir=nowhere"), "data.dir", "manifest.json")


def test_submit_without_sbatch_suggests_dry_run(workdir, capsys):
    assert slurm.main(_submit_args()) == 2
    err = capsys.readouterr().err
    assert "sbatch not found" in err and "--dry-run" in err
    assert not (workdir / "runs").exists()


def _fake_run_dir(workdir: Path, overrides: list[str], world_size: int = 2, complete: bool = True) -> Path:
    """A run directory holding a checkpoint of the run configured by ``overrides``, laid out as the trainer's
    checkpoint manager writes it (``step_*/checkpoint.json`` with the resolved config and the world size)."""
    from pretrain.config import load

    run_dir = workdir / "runs" / "r1"
    tag = run_dir / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text(tag.name)
    resolved = load(TINY_CONFIG, overrides).to_dict()
    (run_dir / "config.json").write_text(json.dumps(resolved))
    if complete:
        (tag / "checkpoint.json").write_text(
            json.dumps({"step": 4, "tag": tag.name, "world_size": world_size, "files": {}, "config": resolved})
        )
    return run_dir


SAME_RUN = ["data.dir=shards", "train.output_dir=runs/r1"]


@pytest.mark.parametrize(
    "change, named",
    [("teacher.name_or_path=embedded:minilm-l6", "teacher.name_or_path"), ("student.layers=[0, 1]", "student.layers")],
)
def test_submit_refuses_another_runs_checkpoints(workdir, capsys, change, named):
    _fake_run_dir(workdir, [*SAME_RUN, change])
    _assert_refused(workdir, capsys, _submit_args(), "holds checkpoints of another run", named, "train.output_dir")


def test_submit_refuses_another_world_size_unless_allowed(workdir, capsys):
    _fake_run_dir(workdir, SAME_RUN, world_size=4)
    _assert_refused(
        workdir,
        capsys,
        _submit_args(),
        "written by 4 rank(s), this run has 2",
        "train.allow_world_size_change",
        "--nodes x --gpus-per-node = 2 rank(s)",
    )
    assert slurm.main(_submit_args("--dry-run", "train.allow_world_size_change=true")) == 0


def test_submit_follows_the_trainers_identity_rule(workdir, capsys):
    """One rule (pretrain.rundir) for the trainer and submit: a changed teacher.dtype is the same run, resumed; a
    changed student key is another run."""
    _fake_run_dir(workdir, [*SAME_RUN, "teacher.dtype=bfloat16"])
    assert slurm.main(_submit_args("--gres", "none", "--dry-run", "teacher.dtype=float32")) == 0
    assert capsys.readouterr().out.startswith("#!/bin/bash\n")
    _assert_refused(
        workdir,
        capsys,
        _submit_args("--dry-run", "student.layers=[1, 3]"),
        "holds checkpoints of another run",
        "student.layers",
        "train.output_dir",
    )


def test_submit_refuses_incomplete_checkpoints(workdir, capsys):
    _fake_run_dir(workdir, SAME_RUN, complete=False)
    _assert_refused(workdir, capsys, _submit_args(), "none is complete")


def test_submit_resumes_the_same_run(workdir, capsys):
    _fake_run_dir(workdir, SAME_RUN)
    _fake_sbatch(workdir / "bin")
    # a longer schedule, other intervals and loss weights: the same run, resumed (as the trainer decides)
    assert (
        slurm.main(_submit_args("--gres", "none", "train.max_steps=16", "train.log_interval=2", "loss.alpha_ce=1.0"))
        == 0
    )
    assert capsys.readouterr().out == "4242\n"


# ---- a real one-node SLURM cluster ------------------------------------------------------------------------------

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A started one-node cluster (2 CPUs); installed with apt-get when missing. Fails (never skips) when the
    daemons cannot start, saying why."""
    from tests.slurm_cluster import ClusterError, SlurmCluster

    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        c.start()
    except ClusterError as e:
        c.stop()
        pytest.fail(f"the SLURM test cluster could not start: {e}", pytrace=False)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random BERT teacher (MLM head, 4 layers, hidden 32, WordPiece trained in-process) and shards of a
    small English corpus prepared with it (max_seq_length 32): the overrides that point tiny-cpu.json at them."""
    from data_prep.prepare import PrepareConfig, prepare
    from tests import tiny

    root = tmp_path_factory.mktemp("assets")
    tok = tiny.bert_tokenizer()
    tiny.save_model_dir(root / "teacher", tiny.bert_model(tok, layers=4, hidden=32), tok)
    lines = tiny.corpus(40)
    (root / "corpus.txt").write_text("\n\n".join(" ".join(lines[i : i + 3]) for i in range(0, len(lines), 3)) + "\n")
    prepare(
        PrepareConfig(
            sources=[f"text:{root}/corpus.txt"],
            tokenizer=str(root / "teacher"),
            max_seq_length=32,
            output=str(root / "shards"),
            valid_fraction=0.1,
            num_proc=0,
            progress=False,
        )
    )
    return [f"teacher.name_or_path={root / 'teacher'}", f"data.dir={root / 'shards'}"]


def _run_submit(cluster, run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """``launch/slurm.py submit`` of tiny-cpu.json (2 CPU ranks on the node), as a user types it."""
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "slurm.py"),
            "submit",
            "--config",
            str(TINY_CONFIG),
            "--nodes",
            "1",
            "--gpus-per-node",
            "2",
            "--gres",
            "none",
            "--time",
            "10",
            f"train.output_dir={run_dir}",
            *overrides,
        ],
        cwd=run_dir.parent,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _submit(cluster, run_dir: Path, overrides: list[str]) -> str:
    """Submit with :func:`_run_submit`; returns the job id."""
    proc = _run_submit(cluster, run_dir, overrides)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert job_id.isdigit(), proc.stdout
    return job_id


def _logs(run_dir: Path) -> str:
    """Every SLURM log of the run (batch and per node), for assertion messages."""
    return "\n".join(
        f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}" for p in sorted((run_dir / "slurm").glob("*.log"))
    )


def _train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("split") == "train"]


def _check_export(run_dir: Path, step: int) -> None:
    from transformers import AutoModelForMaskedLM

    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    manifest = json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "checkpoint.json").read_text())
    assert manifest["step"] == step and manifest["world_size"] == 2
    student = AutoModelForMaskedLM.from_pretrained(run_dir / "student")
    assert student.config.num_hidden_layers == 2  # every_other of the 4-layer teacher


@pytest.mark.slurm
@pytest.mark.slow
def test_submitted_run_finishes_with_checkpoint_and_export(cluster, assets, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(cluster, run_dir, assets)
    again = _run_submit(cluster, run_dir, assets)  # a second job on the same run directory is refused
    assert again.returncode == 2 and f"job(s) {job} (" in again.stderr and "already train" in again.stderr, again.stderr
    info = cluster.wait_for(job, TERMINAL, JOB_TIMEOUT_S)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{_logs(run_dir)}"
    _check_export(run_dir, 8)
    assert [r["step"] for r in _train_records(run_dir)] == list(range(1, 9))
    batch_log = (run_dir / "slurm" / f"{job}.log").read_text()
    assert "2 rank(s) per node" in batch_log and "ranks exited with status 0" in batch_log
    node_log = (run_dir / "slurm" / f"{job}-node0.log").read_text()  # one log per node, lines labelled by rank
    assert "0: [pretrain] 2 rank(s) on cpu" in node_log, node_log[-3000:]
    assert any(line.startswith("1: ") for line in node_log.splitlines())
    # the node list expander agrees with SLURM's own on the lists SLURM accepts
    for nodelist in ("node[01-03,07],gpu5", "r[1-2]-n[8-10]", f"{cluster.hostname},x[009-011]"):
        out = cluster.run(["scontrol", "show", "hostnames", nodelist]).stdout.split()
        assert slurm.expand_nodelist(nodelist) == out == slurm.hostnames(nodelist)


@pytest.mark.slurm
@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_with_continuous_steps(cluster, assets, tmp_path):
    import time

    run_dir = tmp_path / "run"
    max_steps = 60
    overrides = [
        *assets,
        f"train.max_steps={max_steps}",
        "train.save_interval=0",
        "train.eval_interval=0",
        "train.export_init=false",
    ]
    job = _submit(cluster, run_dir, overrides)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(r["step"] >= 3 for r in _train_records(run_dir)):  # training, its handlers installed
        assert time.monotonic() < deadline, f"no step 3 after {JOB_TIMEOUT_S} s\n{_logs(run_dir)}"
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), f"{cluster.job(job)}\n{_logs(run_dir)}"
        time.sleep(0.2)
    # what --signal=B:USR1@120 does before the time limit: USR1 to the batch script only
    cluster.run(["scancel", "--signal=USR1", "--batch", job])
    info = cluster.wait_for(job, TERMINAL, 2 * JOB_TIMEOUT_S)
    logs = _logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{logs}"
    batch_log = (run_dir / "slurm" / f"{job}.log").read_text()
    assert "caught SIGUSR1" in batch_log and "requeueing" in batch_log and "(restart 1)" in batch_log, logs
    node_log = (run_dir / "slurm" / f"{job}-node0.log").read_text()
    stopped = [
        int(line.split(" at step ")[1].split(":")[0])
        for line in node_log.splitlines()
        if "[pretrain] stopped by SIGUSR1 at step" in line
    ]
    assert len(stopped) == 1 and 3 <= stopped[0] < max_steps, logs
    assert f"(step {stopped[0]}," in node_log.split("resumed from", 1)[-1], logs
    records = _train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, max_steps + 1)), logs  # continuous: no restart from 0
    tokens = [r["tokens_seen"] for r in records]
    assert all(b > a for a, b in itertools.pairwise(tokens)), tokens  # the counters resumed too
    _check_export(run_dir, max_steps)


def test_requeue_skips_a_finished_run(tmp_path):
    """The batch script's ``finished`` test (``python -m pretrain.rundir finished``): true only when student/ is the
    export of the latest checkpoint (the trainer exports only at the end), so a USR1 that arrives during the final
    export does not requeue."""
    body = slurm._BODY
    func = body[body.index("finished() {") : body.index("\n", body.index("finished() {")) + 1]
    run = tmp_path / "run"

    def finished() -> bool:
        return (
            subprocess.run(
                ["/bin/bash", "-c", f"{func}\nfinished"],
                cwd=tmp_path,
                env={"RUN_DIR": str(run), "PYTHON": sys.executable},
            ).returncode
            == 0
        )

    assert not finished()  # nothing yet
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000012")
    assert not finished()  # stopped, never exported
    (run / "student").mkdir()
    info = run / "student" / "distill_export.json"
    info.write_text(json.dumps({"checkpoint": str(run / "checkpoints" / "step_00000008"), "step": 8}, indent=1))
    assert not finished()  # an export of an earlier, shorter schedule
    info.write_text(json.dumps({"checkpoint": str(run / "checkpoints" / "step_00000012"), "step": 12}, indent=1))
    assert finished()
