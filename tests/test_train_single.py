"""One-rank training runs: every shipped config for two steps with a tiny teacher of its family, exact resume and a
corrupt checkpoint (ZeRO-0), export, bad input, non-finite steps, and SIGTERM to a plain `python launch/pretrain.py`.

Most runs are in this process (the real DeepSpeed engine with a one-rank gloo group), which keeps them fast; the
signal test starts the entry point as a user would.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from pretrain.config import load
from pretrain.schema import ConfigError
from tests.helpers import (
    PY,
    REPO,
    assert_same_losses,
    assets,
    env,
    losses,
    read_metrics,
    run_cmd,
    tiny_overrides,
    train_in_process,
    wait_for_step,
)

TINY = REPO / "configs" / "tiny-cpu.json"
# task-distillation configs need a fine-tuned classifier teacher: tests/test_taskmode.py runs them
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.json") if not load(p).task.name)


def shipped_overrides(path: Path, out: Path) -> list[str]:
    """Swap a shipped config's teacher for a tiny local model of the same family, on CPU, small batches."""
    cfg = load(path)
    family = "roberta" if "roberta" in cfg.teacher.name_or_path.lower() else "bert"
    has_head = cfg.loss.alpha_ce > 0 or cfg.loss.alpha_mlm > 0
    extra: dict[str, Any] = {
        "deepspeed.fp16.enabled": False,
        "train.eval_interval": 2,
        "train.eval_sequences": 8,
        "train.save_interval": 2,
        "deepspeed.scheduler.params.warmup_num_steps": 1,
    }
    if path.name == "distilroberta-large.json":
        extra["deepspeed.bf16.enabled"] = True  # one shipped config exercises bf16 on CPU
    if not has_head:
        extra["teacher.name_or_path"] = str(assets()["bert-nohead"])
    if isinstance(cfg.student.layers, list) and max(cfg.student.layers) >= 4:  # tiny teachers have 4 layers
        extra["student.layers"] = "every_other"
    if cfg.loss.relation_heads:
        extra["loss.relation_heads"] = 4
    if cfg.student.hidden_size:  # the tiny teachers: hidden 32, 4 heads of 8, feed-forward 128
        extra["student.hidden_size"] = 16
        extra["student.num_attention_heads"] = 2 if cfg.student.init == "prune" else 4  # pruning keeps head size 8
        if cfg.student.intermediate_size:
            extra["student.intermediate_size"] = 64
    return tiny_overrides(family, out, steps=2, **extra)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_runs_two_steps_with_a_tiny_teacher(path, tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM

    out = tmp_path / "run"
    cfg = load(path, shipped_overrides(path, out))
    trainer = train_in_process(cfg)
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2]
    alphas = cfg.loss.active()
    active = [f"loss_{k}" for k in alphas]
    for r in recs:
        assert math.isfinite(r["loss"]) and all(math.isfinite(r[k]) for k in active), r
        # every configured term is computed (a student is never the teacher: each term > 0) and the logged loss is
        # their weighted sum: the per-micro-batch totals are fp32 sums of <= 7 terms (relative error <= 7 x 2^-24
        # each), averaged in float64: rtol 1e-5
        assert all(r[k] > 0 for k in active), r
        assert r["loss"] == pytest.approx(sum(a * r[f"loss_{k}"] for k, a in alphas.items()), rel=1e-5), r
        assert r["tokens_seen"] > 0 and r["masked_tokens_seen"] > 0 and r["lr"] >= 0
    valid = read_metrics(out, "valid")
    assert valid and valid[-1]["step"] == 2
    if trainer.model.student.config.hidden_size == trainer.model.teacher.config.hidden_size:  # else no cosine
        assert 0 < valid[-1]["hidden_cosine"] <= 1 + 1e-6
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    n_layers = len(trainer.student_record["layer_map"])
    loader = AutoModelForMaskedLM if "mlm_loss" in valid[-1] else AutoModel
    student = loader.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == n_layers
    assert (out / "student_init" / "model.safetensors").is_file() == cfg.train.export_init
    if cfg.student.architecture == "distilbert":
        assert type(student).__name__.startswith("DistilBert")


def test_exact_resume_and_a_corrupt_checkpoint(tmp_path, capfd):
    """6 steps straight == 3 steps, then the same command resumed to 6 (fp32, ZeRO-0, 1e-6). Then the newest
    checkpoint of the straight run is corrupted: the rerun warns, resumes from the previous one, logs the same."""
    common = {
        "deepspeed.zero_optimization.stage": 0,
        "train.save_interval": 3,
        "train.eval_interval": 0,
        "deepspeed.scheduler.params.total_num_steps": 6,
        "train.export_init": False,
        "train.keep_last": 2,
    }
    a, b = tmp_path / "a", tmp_path / "b"
    train_in_process(load(TINY, tiny_overrides("roberta", a, steps=6, **common)))
    train_in_process(load(TINY, tiny_overrides("roberta", b, steps=3, **common)))
    assert sorted(losses(b)) == [1, 2, 3]
    train_in_process(load(TINY, tiny_overrides("roberta", b, steps=6, **common)))
    la, lb = losses(a), losses(b)
    assert sorted(lb) == [1, 2, 3, 4, 5, 6]  # each step logged once
    assert_same_losses(la, lb, range(1, 7))
    assert la[4]["loss"] != la[5]["loss"]
    ra, rb = read_metrics(a), read_metrics(b)
    assert ra[-1]["tokens_seen"] == rb[-1]["tokens_seen"] > 0
    assert rb[-1]["masked_tokens_seen"] == ra[-1]["masked_tokens_seen"]

    # export CLI on the ZeRO-0 checkpoint gives the same weights as the run's own export
    from safetensors.torch import load_file

    from pretrain import export

    assert export.main([str(a / "checkpoints"), str(tmp_path / "exported")]) == 0
    w1, w2 = load_file(a / "student" / "model.safetensors"), load_file(tmp_path / "exported" / "model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)

    states = a / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    capfd.readouterr()
    train_in_process(load(TINY, tiny_overrides("roberta", a, steps=6, **common)))
    err = capfd.readouterr().err
    assert "skipping checkpoint" in err and "step_00000006" in err and "sha256" in err
    assert sorted(losses(a)) == [1, 2, 3, 4, 5, 6]
    assert_same_losses(losses(a), la, range(1, 7))
    assert (a / "checkpoints" / "latest").read_text() == "step_00000006"
    with pytest.raises(
        ConfigError,
        match=r"holds checkpoints of another run \(step_00000006: student\.layers: 'every_other' -> \[0, 3\]",
    ):
        train_in_process(load(TINY, tiny_overrides("roberta", a, steps=6, **common, **{"student.layers": [0, 3]})))


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("missing_teacher", r"teacher\.name_or_path: '/nonexistent/teacher' cannot be loaded"),
        ("other_tokenizer", r"data\.dir: the shards in .* were made with the tokenizer .*vocab_size 598 vs 36[0-9]"),
        ("too_long", r"max_seq_length 64 .* exceeds the 32 positions"),
        ("no_mlm_head", r"loss\.alpha_ce: 5\.0 needs an MLM head"),
        ("missing_shards", r"data\.dir: .*nowhere/manifest\.json: not found.*python -m data_prep prepare"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_work(case, pattern, tmp_path):
    a = assets()
    out = tmp_path / "run"
    teacher = {
        "missing_teacher": "/nonexistent/teacher",
        "other_tokenizer": str(a["bert"]),
        "too_long": str(a["bert-short"]),
        "no_mlm_head": str(a["bert-nohead"]),
    }.get(case, str(a["bert"]))
    shards = {"other_tokenizer": a["shards-roberta"], "missing_shards": tmp_path / "nowhere"}.get(
        case, a["shards-bert"]
    )
    cfg = load(TINY, tiny_overrides("bert", out, steps=2, **{"teacher.name_or_path": teacher, "data.dir": str(shards)}))
    with pytest.raises(ConfigError, match=pattern):
        train_in_process(cfg)
    assert not (out / "checkpoints").exists() and not (out / "student_init").exists()


def test_sentence_encoder_teacher_exports_pooling_files(tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "run"
    cfg = load(
        TINY,
        tiny_overrides(
            "bert",
            out,
            steps=2,
            **{
                "teacher.name_or_path": str(assets()["bert-nohead"]),
                "loss.alpha_ce": 0.0,
                "loss.alpha_mlm": 0.0,
                "loss.alpha_cos": 1.0,
                "loss.alpha_pool": 1.0,
                "train.eval_interval": 2,
                "train.eval_sequences": 8,
            },
        ),
    )
    train_in_process(cfg)
    rec = read_metrics(out)[-1]
    assert {"loss_cos", "loss_pool"} <= rec.keys() and "loss_ce" not in rec
    valid = read_metrics(out, "valid")[-1]
    assert "mlm_loss" not in valid and "pooled_cosine" in valid
    for d in ("student", "student_init"):
        assert (out / d / "modules.json").is_file() and (out / d / "1_Pooling" / "config.json").is_file()
    emb = SentenceTransformer(str(out / "student"), device="cpu").encode(["the quick brown fox"])
    assert emb.shape == (1, 32)


@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_steps_are_skipped_then_the_run_stops(stage, tmp_path):
    """A NaN loss at step 3 is skipped (weights unchanged); NaN at steps 7, 8, 9 stops the run after
    train.max_bad_steps=3 with a clear error, and the last checkpoint (step 8) holds the weights of step 6."""
    from pretrain.export import student_state_dict
    from pretrain.trainer import TrainingError

    out = tmp_path / "run"
    cfg = load(
        TINY,
        tiny_overrides(
            "roberta",
            out,
            steps=20,
            **{
                "deepspeed.zero_optimization.stage": stage,
                "train.save_interval": 2,
                "train.max_bad_steps": 3,
                "train.eval_interval": 0,
                "train.export_init": False,
            },
        ),
    )
    bad = {2, 6, 7, 8}  # 0-based step index at forward time
    snaps = {}

    def inject(trainer):
        model = trainer.engine.module
        forward = model.forward

        def nan_forward(*args, **kwargs):
            s = trainer.step
            if s not in snaps:
                snaps[s] = {k: v.detach().clone() for k, v in model.student.state_dict().items()}
            loss, parts = forward(*args, **kwargs)
            if s in bad:
                loss, parts = loss * float("nan"), {**parts, "loss": parts["loss"] * float("nan")}
            return loss, parts

        model.forward = nan_forward

    with pytest.raises(TrainingError, match=r"step 9: 3 consecutive steps .*train\.max_bad_steps=3.*up to step 8"):
        train_in_process(cfg, before_fit=inject)
    assert all(torch.equal(snaps[2][k], snaps[3][k]) for k in snaps[2])  # step 3 skipped
    assert not all(torch.equal(snaps[3][k], snaps[4][k]) for k in snaps[3])  # step 4 trained
    recs = {r["step"]: r for r in read_metrics(out)}
    assert recs[3]["skipped_steps"] == 1 and recs[3]["loss"] is None and math.isfinite(recs[4]["loss"])
    assert (out / "checkpoints" / "latest").read_text() == "step_00000008"
    saved = student_state_dict(out / "checkpoints" / "step_00000008")
    for k, v in saved.items():
        assert torch.isfinite(v).all() and torch.equal(v, snaps[6][k].float()), k


def test_plain_python_sigterm_checkpoints_and_the_same_command_resumes(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    over = tiny_overrides(
        "bert",
        out,
        steps=400,
        **{
            "deepspeed.zero_optimization.stage": 0,
            "train.save_interval": 0,
            "train.eval_interval": 0,
            "deepspeed.scheduler.params.total_num_steps": 400,
            "train.export_init": False,
        },
    )
    cmd = [PY, "launch/pretrain.py", "--config", str(TINY), *over]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
        wait_for_step(out, 2, proc, log)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 0, text
    k = read_metrics(out)[-1]["step"]
    assert f"stopped by SIGTERM at step {k}" in text and k < 400
    assert (out / "checkpoints" / "latest").read_text() == f"step_{k:08d}"
    r = run_cmd([*cmd, f"train.max_steps={k + 2}"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {out / 'checkpoints' / f'step_{k:08d}'}" in r.stdout
    assert [x["step"] for x in read_metrics(out)] == list(range(1, k + 3))
    assert json.loads((out / "student" / "distill_export.json").read_text())["step"] == k + 2
