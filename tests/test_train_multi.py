"""Two-rank DeepSpeed runs on CPU (gloo), started with the launchers as users run them.

The reference is the "two nodes on one machine" launch: two `deepspeed --hostfile H --no_ssh --node_rank R` launchers,
one rank each, 24 steps of ZeRO-2 with gradient accumulation 2. The same config on one node (`deepspeed --num_gpus 2`)
is stopped by SIGUSR1 to both ranks and resumed by the same command: every step, before and after the stop, logs the
reference's losses (1e-6), so one-node == two-node and stop + resume == straight. Then ZeRO-1 under torchrun, ZeRO-3
with the `python -m pretrain.export` CLI, and resuming with another world size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess

import pytest

from pretrain.config import load
from pretrain.schema import ConfigError
from tests.helpers import (
    PY,
    REPO,
    assert_effect,
    assert_same_losses,
    deepspeed_cmd,
    env,
    free_port,
    losses,
    read_metrics,
    run_cmd,
    tiny_overrides,
    train_in_process,
    wait_for_ranks,
    wait_for_step,
)
from tests.test_rank_invariants import micro_batch_counts, reference_ids, shard_sequences

pytestmark = pytest.mark.slow

TINY = REPO / "configs" / "tiny-cpu.json"
STEPS = 24


def overrides(out, steps=STEPS, **extra):
    """The reference setting: tiny RoBERTa, 8 sequences/step = micro 2 x accumulation 2 x 2 ranks, a 24-step
    schedule whatever max_steps is (so that shorter runs follow the same learning rates)."""
    return tiny_overrides(
        "roberta",
        out,
        steps=steps,
        **{
            "deepspeed.train_batch_size": 8,
            "deepspeed.scheduler.params.total_num_steps": STEPS,
            "train.save_interval": 12,
            "train.eval_interval": 12,
            "train.eval_sequences": 16,
            "train.keep_last": 2,
            **extra,
        },
    )


def reference_counts_seen(steps: int, *, micro: int = 2, ranks: int = 2, accumulation: int = 2) -> list[tuple]:
    """(tokens seen, masked tokens seen) after each of ``steps`` steps of the reference setting, counted from the
    shard files and the documented data order (tests/test_rank_invariants.py: ``reference_ids``): step s reads
    global micro-batches s x accumulation, ...; rank r's micro-batch is positions r, r + ranks, ... of one, masked
    on its own (ceil(0.15 x its non-special tokens))."""
    seqs, manifest = shard_sequences("roberta")
    special = manifest["tokenizer"]["all_special_ids"]
    seen, tokens, masked = [], 0, 0
    for g in range(steps * accumulation):
        ids = reference_ids(len(seqs), g, size=micro * ranks)  # tiny-cpu.json's seed
        for r in range(ranks):
            t, m = micro_batch_counts(seqs, ids[r::ranks], special)
            tokens, masked = tokens + t, masked + m
        if (g + 1) % accumulation == 0:
            seen.append((tokens, masked))
    return seen


def check(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The reference run: two launchers on this machine, node_rank 0 and 1, one rank each."""
    out = tmp_path_factory.mktemp("two-nodes") / "run"
    hostfile = out.parent / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            PY,
            "-m",
            "deepspeed.launcher.runner",
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "launch/pretrain.py",
            "--config",
            str(TINY),
            *overrides(out, **{"train.export_init": False}),
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, text in zip(procs, outputs, strict=False):
        assert p.returncode == 0, text[-6000:]
    assert "nnodes=2, num_local_procs=1, node_rank=1" in outputs[1]
    return out


@pytest.fixture(scope="module")
def one_node(two_nodes, tmp_path_factory):
    """One launcher, two ranks; SIGUSR1 to both ranks after step 2; then the same command again.
    Returns (run dir, stop step, output of the stopped run, output of the resumed run)."""
    out = tmp_path_factory.mktemp("one-node") / "run"
    log = out.parent / "log.txt"
    cmd = deepspeed_cmd(TINY, overrides(out))
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
        pids = wait_for_ranks(proc, 2, log)
        wait_for_step(out, 2, proc, log)
        for sig in (signal.SIGSTOP, signal.SIGUSR1, signal.SIGCONT):  # freeze both, signal both, go on
            for pid in pids:
                os.kill(pid, sig)
        rc = proc.wait(timeout=180)
    stopped = log.read_text()
    assert rc == 0, stopped[-6000:]
    k = read_metrics(out)[-1]["step"]
    resumed = check(run_cmd(cmd))
    return out, k, stopped, resumed


def test_sigusr1_to_both_ranks_checkpoints_and_exits_0(one_node):
    out, k, stopped, resumed = one_node
    assert 2 <= k < STEPS and f"stopped by SIGUSR1 at step {k}" in stopped
    assert f"resumed from {out / 'checkpoints' / f'step_{k:08d}'}" in resumed


def test_one_node_and_resumed_run_log_the_two_node_losses(one_node, two_nodes):
    out, _k, _, _ = one_node
    got, want = losses(out), losses(two_nodes)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))  # each step logged once
    assert_same_losses(want, got, range(1, STEPS + 1))  # 1..k one node vs two nodes; k+1.. after the resume
    assert read_metrics(out)[-1]["tokens_seen"] == read_metrics(two_nodes)[-1]["tokens_seen"]
    v1, v2 = read_metrics(out, "valid"), read_metrics(two_nodes, "valid")
    assert [v["step"] for v in v1] == [v["step"] for v in v2] == [12, 24]
    assert v1[-1]["mlm_loss"] == pytest.approx(v2[-1]["mlm_loss"], abs=1e-6)


def test_two_rank_run_writes_checkpoints_metrics_tensorboard_and_exports(one_node):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForMaskedLM, pipeline

    ref = one_node[0]
    recs = read_metrics(ref)
    for key in (
        "tokens_seen",
        "masked_tokens_seen",
        "loss",
        "loss_ce",
        "loss_mlm",
        "loss_cos",
        "lr",
        "grad_norm",
        "loss_scale",
        "tokens_per_s",
        "seconds_per_step",
    ):
        assert all(r[key] is not None and math.isfinite(r[key]) for r in recs), key
    # every step's tokens and masked tokens, all ranks counted, exactly as counted here from the shard files
    assert [(r["tokens_seen"], r["masked_tokens_seen"]) for r in recs] == reference_counts_seen(STEPS)
    assert_effect("loss drop, first step to last (it learns)", recs[0]["loss"] - recs[-1]["loss"], 0.0)
    assert max(r["lr"] for r in recs) == pytest.approx(5e-4) and recs[-1]["lr"] < 5e-5
    for v in read_metrics(ref, "valid"):
        assert v["perplexity"] == pytest.approx(math.exp(v["mlm_loss"]))
        assert 0 <= v["mlm_accuracy"] <= 1 and 0 <= v["agreement"] <= 1 and v["kl_to_teacher"] >= 0
    ckpt = ref / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step_{STEPS:08d}"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000012", f"step_{STEPS:08d}"]  # keep_last 2
    manifest = json.loads((ckpt / f"step_{STEPS:08d}" / "checkpoint.json").read_text())
    assert manifest["world_size"] == 2 and {"rng_rank_00000.pt", "rng_rank_00001.pt"} <= manifest["files"].keys()
    assert json.loads((ref / "config.json").read_text())["train"]["max_steps"] == STEPS
    ea = EventAccumulator(str(ref / "tensorboard"))
    ea.Reload()
    assert sorted(e.step for e in ea.Scalars("train/loss")) == list(range(1, STEPS + 1))
    assert len(ea.Scalars("valid/mlm_loss")) == 2
    model = AutoModelForMaskedLM.from_pretrained(ref / "student")
    assert model.config.num_hidden_layers == 2
    fill = pipeline("fill-mask", model=str(ref / "student"), device="cpu")
    assert len(fill("The quick brown <mask> jumps over the lazy dog.")) == 5
    assert (ref / "student_init" / "model.safetensors").is_file()


def test_zero1_under_torchrun(two_nodes, tmp_path):
    out = tmp_path / "run"
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "launch/pretrain.py",
        "--config",
        str(TINY),
        *overrides(out, steps=3, **{"deepspeed.zero_optimization.stage": 1, "train.export_init": False}),
    ]
    text = check(run_cmd(cmd))
    assert "2 rank(s) on cpu, fp32, ZeRO-1" in text
    assert_same_losses(losses(two_nodes), losses(out), range(1, 4), tol=1e-4)  # ZeRO-2 reduces in another order


def test_zero3_run_and_export_cli(two_nodes, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    from pretrain import export

    out = tmp_path / "run"
    text = check(
        run_cmd(
            deepspeed_cmd(
                TINY, overrides(out, steps=3, **{"deepspeed.zero_optimization.stage": 3, "train.export_init": False})
            )
        )
    )
    assert "ZeRO-3" in text
    assert_same_losses(losses(two_nodes), losses(out), range(1, 4), tol=1e-4)
    assert read_metrics(out, "valid")[-1]["step"] == 3
    exported = tmp_path / "exported"
    assert export.main([str(out / "checkpoints"), str(exported)]) == 0  # python -m pretrain.export, in-process
    a, b = load_file(out / "student" / "model.safetensors"), load_file(exported / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    model = AutoModelForMaskedLM.from_pretrained(exported)
    assert all(p.abs().sum() > 0 for p in model.parameters())  # consolidated, not empty ZeRO-3 placeholders


def test_other_world_size_is_refused_unless_allowed(one_node, tmp_path, capfd):
    """2 ranks -> 1 rank: refused unless allowed; allowed, the ZeRO-2 checkpoint loads through DeepSpeed's universal
    checkpoint (weights and AdamW moments re-sharded; tests/test_reshard.py compares the moments), which is removed
    once loaded."""
    run = tmp_path / "run"
    shutil.copytree(one_node[0], run)
    with pytest.raises(ConfigError, match=r"written by 2 rank\(s\), this run has 1.*allow_world_size_change"):
        train_in_process(load(TINY, overrides(run, steps=STEPS + 2)))
    cfg = load(
        TINY,
        overrides(
            run,
            steps=STEPS + 2,
            **{"train.allow_world_size_change": True, "deepspeed.scheduler.params.total_num_steps": STEPS + 2},
        ),
    )
    capfd.readouterr()
    train_in_process(cfg)
    out = capfd.readouterr().out
    assert "world size 2 -> 1 with ZeRO-2: weights, AdamW moments, step and schedule resumed" in out, out[-3000:]
    assert "moments restart" not in out and not (run / "checkpoints" / "universal").exists()
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 3)) and math.isfinite(recs[-1]["loss"])
