"""Task distillation on your own CSV, as docs/task-distillation.md gives it (issue 24 item 5): fine-tune a teacher
with `pretrain.downstream --save-model`, which prints where the model went; give that folder to a task run on the
same CSV. A --head mean teacher, a missing field and a bare encoder are refused naming the config keys and the fix."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pretrain import downstream as ds
from pretrain.config import load
from pretrain.schema import ConfigError
from pretrain.tasks import LocalFields
from tests import tiny
from tests.helpers import REPO, read_metrics, train_in_process
from tests.test_taskmode import task_overrides

WORDS = {0: ["dull", "slow", "bad", "boring", "weak"], 1: ["great", "fun", "bright", "sharp", "good"]}


@pytest.fixture(scope="module")
def csv_task(tmp_path_factory) -> Path:
    """A two-class CSV folder (train / dev / test) whose label is readable from its words."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("own") / "reviews"
    folder.mkdir()
    for split, n in (("train", 160), ("dev", 40), ("test", 40)):
        with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["review", "verdict"])
            for i in range(n):
                y = int(rng.integers(0, 2))
                w.writerow([" ".join(rng.choice(WORDS[y], size=int(rng.integers(3, 8)))) + f" {split}{i}", y])
    return folder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    tok = tiny.bert_tokenizer()
    return str(tiny.save_model_dir(tmp_path_factory.mktemp("enc") / "bert", tiny.bert_model(tok, layers=2), tok))


def _finetune(encoder: str, task: str, out: Path, head: str) -> list[str]:
    lines: list[str] = []
    ds.run_downstream(
        [task],
        {"teacher": encoder},
        out / "results",
        seeds=1,
        fields=LocalFields(text="review", label="verdict"),
        overrides={"epochs": 2, "lr": 1e-3, "batch_size": 16, "head": head},
        save_model=out / "models",
        plot=False,
        progress=lines.append,
    )
    return lines


def _task_run(teacher: str, task: str, out: Path, **extra) -> list[str]:
    """test_taskmode's tiny task overrides on the CSV task, its fields named as the config names them."""
    fields = {"task.name": task, "task.text_field": "review", "task.label_field": "verdict", "student.layers": [1]}
    return task_overrides(teacher, out, steps=4, **{"task.max_length": 16, **fields, **extra})


def test_own_csv_teacher_then_task_distillation(csv_task, encoder, tmp_path, capsys):
    task = f"csv:{csv_task}"
    lines = _finetune(encoder, task, tmp_path, "cls")
    err = capsys.readouterr().err.replace("\r", "\n")
    # per-epoch progress with its total (10 batches of 16 of the 160 train rows) and the dev score (issue 24 item 10)
    assert "teacher seed 0 epoch 2/2" in err and "10/10" in err and "dev score" in err
    saved = tmp_path / "models" / "teacher" / ds.slug(task)
    assert any(line.endswith(f"saved to {saved}") for line in lines), lines  # downstream says where it went
    run = tmp_path / "run"
    train_in_process(load(REPO / "configs" / "tiny-cpu.json", _task_run(str(saved), task, run)))
    valid = read_metrics(run, "valid")
    assert valid and 0.0 <= valid[-1]["task_accuracy"] <= 1.0
    assert (run / "student" / "config.json").is_file()


def test_a_mean_head_teacher_is_refused_with_the_command_that_makes_one(csv_task, encoder, tmp_path):
    task = f"csv:{csv_task}"
    _finetune(encoder, task, tmp_path, "mean")
    saved = tmp_path / "models" / "teacher" / ds.slug(task)
    with pytest.raises(ConfigError) as e:
        train_in_process(load(REPO / "configs" / "tiny-cpu.json", _task_run(str(saved), task, tmp_path / "run")))
    msg = str(e.value)
    assert "was fine-tuned with --head mean" in msg and "--head cls --save-model DIR" in msg
    assert f"teacher.name_or_path=DIR/teacher/{ds.slug(task)}" in msg


def test_a_bare_encoder_teacher_names_the_folder_to_give(csv_task, encoder, tmp_path):
    task = f"csv:{csv_task}"
    with pytest.raises(ConfigError, match=r"has no classification head .* give teacher\.name_or_path=DIR/teacher/"):
        train_in_process(load(REPO / "configs" / "tiny-cpu.json", _task_run(encoder, task, tmp_path / "run")))


def test_a_missing_field_is_named_by_its_config_key(csv_task, encoder, tmp_path):
    task = f"csv:{csv_task}"
    over = _task_run(encoder, task, tmp_path / "run", **{"task.text_field": "text"})
    with pytest.raises(ConfigError, match=r"no field task\.text_field 'text'; the file has \['review', 'verdict'\]"):
        train_in_process(load(REPO / "configs" / "tiny-cpu.json", over))
