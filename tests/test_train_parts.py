"""The trainer's parts on their own (no training run): the sections they take, the evaluation rule, the metrics log,
the start line, the loss combination without a term, and launch/handover.py without CPython's private helper."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import load
from pretrain.ds_config import BatchPlan
from pretrain.losses import LossConfig, combine_losses
from pretrain.metrics import MetricsLogger, read_metrics, start_line
from pretrain.stages import Stages, stage_losses
from pretrain.teacher import teacher_dtype
from pretrain.validate import evaluation_due

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny-cpu.json"
STAGES = 'train.stages=[{"steps": 3, "loss": {"alpha_ce": 0, "alpha_mse": 1}}, {"steps": 5, "name": "prediction"}]'


def test_stage_losses_takes_the_sections_or_a_whole_run_config():
    cfg = load(TINY, [STAGES])
    by_sections = stage_losses(cfg.train, cfg.loss)
    assert by_sections == stage_losses(cfg)  # the older form, still used by pretrain.config and pretrain.taskmode
    assert [loss.alpha_ce for loss in by_sections] == [0.0, 5.0] and by_sections[0].alpha_mse == 1.0
    stages = Stages(cfg.train, cfg.loss)
    assert stages.names == ["stage 1", "prediction"]
    assert [stages.index(s) for s in (0, 2, 3, 7)] == [0, 0, 1, 1]
    one = load(TINY)
    assert stage_losses(one.train, one.loss) == [one.loss]


def test_teacher_dtype_reads_the_teacher_and_deepspeed_sections():
    cfg = load(TINY)
    fp16 = {"fp16": {"enabled": True}}
    assert teacher_dtype(cfg.teacher, fp16, cuda=False) == torch.float32  # "auto" on CPU
    assert teacher_dtype(cfg.teacher, fp16, cuda=True) == torch.float16
    assert teacher_dtype(cfg.teacher, {"bf16": {"enabled": True}}, cuda=True) == torch.bfloat16
    assert teacher_dtype(cfg.teacher, {}, cuda=True) == torch.float32
    fixed = load(TINY, ["teacher.dtype=bfloat16"])
    assert teacher_dtype(fixed.teacher, fp16, cuda=False) == torch.bfloat16


def test_evaluation_is_due_at_the_interval_and_at_the_last_step():
    assert [s for s in range(1, 11) if evaluation_due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if evaluation_due(s, 0, 10)] == [10]


def test_metrics_logger_keeps_records_up_to_the_resume_step_and_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(path, None, enabled=True, resume_step=0)
    assert path.read_text() == ""  # there from the start, as before any record
    for step in (1, 2, 3):
        log.log({"split": "train", "step": step, "loss": 1.0 / step})
    log.close()
    log.log({"split": "train", "step": 4})  # after close: nothing
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    with path.open("a") as f:
        f.write('{"split": "train", "st')  # a torn line of a killed run
    resumed = MetricsLogger(path, None, enabled=True, resume_step=2)
    resumed.log({"split": "valid", "step": 3})
    resumed.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"split": "train", "step": 1, "loss": 1.0},
        {"split": "train", "step": 2, "loss": 0.5},
        {"split": "valid", "step": 3},
    ]
    MetricsLogger(tmp_path / "other.jsonl", None, enabled=False, resume_step=0).log({"split": "train", "step": 1})
    assert not (tmp_path / "other.jsonl").exists()  # ranks > 0 write nothing


class _Model:
    def __init__(self, n_teacher: int, n_student: int):
        self.teacher = torch.nn.Linear(n_teacher, 1, bias=False)
        self.student = torch.nn.Linear(n_student, 1, bias=False)


def test_start_line_of_a_fresh_and_a_resumed_run():
    common = {
        "world_size": 2,
        "device": "cpu",
        "precision": "fp32",
        "stage": 2,
        "plan": BatchPlan(8, 2, 2),
        "model": _Model(1_500_000, 250_000),
        "layer_map": [0, 2],
        "run_dir": Path("runs/x"),
    }
    fresh = start_line(**common, resumed_from=None, step=0, tokens_seen=0)
    assert fresh == (
        "[pretrain] 2 rank(s) on cpu, fp32, ZeRO-2; 8 sequences/step = micro 2 x accumulation 2 x 2 ranks; teacher "
        "1.5M -> student 0.2M parameters (layers [0, 2]); fresh run; run dir runs/x"
    )
    resumed = start_line(**common, resumed_from=Path("runs/x/checkpoints/step_00000004"), step=4, tokens_seen=12345)
    assert "; resumed from runs/x/checkpoints/step_00000004 (step 4, 12,345 tokens seen); run dir runs/x" in resumed


def test_combine_losses_without_an_active_term_says_so():
    off = LossConfig(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0)
    assert not off.active()
    with pytest.raises(ValueError, match="no active loss term"):
        combine_losses(off, {})


def test_handover_runs_without_cpythons_private_flag_helper(monkeypatch):
    spec = importlib.util.spec_from_file_location("handover_under_test", REPO / "launch" / "handover.py")
    assert spec is not None and spec.loader is not None
    handover = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handover)
    assert handover.interpreter_flags() == subprocess._args_from_interpreter_flags()
    monkeypatch.delattr(subprocess, "_args_from_interpreter_flags")
    cmd = handover.command("pretrain.main", ["--config", "c.json"])
    assert cmd[0] == sys.executable and cmd[-4:] == ["-m", "pretrain.main", "--config", "c.json"]
