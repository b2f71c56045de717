"""The deepspeed section against DeepSpeed's own schema (pretrain.ds_schema): typos are refused with a suggestion."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import ds_schema
from pretrain.config import load as load_config
from pretrain.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "deepspeed.zero_optimizaton.stage=3",
            "deepspeed.zero_optimizaton: unknown key; did you mean 'zero_optimization'?",
        ),
        ("deepspeed.bf16.enable=true", "deepspeed.bf16.enable: unknown key; did you mean 'enabled'?"),
        (
            "deepspeed.gradient_clippping=1.0",
            "deepspeed.gradient_clippping: unknown key; did you mean 'gradient_clipping'?",
        ),
        (
            "deepspeed.zero_optimization.stage=5",
            "deepspeed.zero_optimization.stage: 5 is not valid: Input should be 0, 1, 2, 3",
        ),
        ('deepspeed.fp16.loss_scale="x"', "deepspeed.fp16.loss_scale:"),
    ],
)
def test_typos_and_bad_values_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "demo.json", [override])
    assert message in str(e.value)


def test_the_cli_refuses_the_three_typos_of_the_issue():
    """The command users run: exit 2, one line per typo, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.config",
            "configs/demo.json",
            "deepspeed.zero_optimizaton.stage=3",
            "deepspeed.bf16.enable=true",
            "deepspeed.gradient_clippping=1.0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "did you mean 'zero_optimization'" in proc.stderr
    assert "did you mean 'gradient_clipping'" in proc.stderr


def test_every_shipped_config_passes():
    for path in sorted((ROOT / "configs").glob("*.json")):
        ds_schema.check(json.loads(path.read_text())["deepspeed"])


def test_top_level_keys_are_what_deepspeed_reads():
    """Recorded from DeepSpeed itself: the keys the project and its docs use are there, a typo is not, and a key
    that only nests inside a section ("stage") is not a top-level key."""
    keys = ds_schema.top_level_keys()
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "optimizer",
        "scheduler",
        "zero_optimization",
        "fp16",
        "bf16",
        "gradient_clipping",
        "steps_per_print",
        "activation_checkpointing",
        "flops_profiler",
    ):
        assert key in keys
    assert "zero_optimizaton" not in keys and "stage" not in keys and "enabled" not in keys


def test_a_section_that_is_not_an_object_is_refused():
    with pytest.raises(ConfigError, match=r"deepspeed\.bf16: True must be an object"):
        ds_schema.check({"train_batch_size": 8, "bf16": True})


def _config_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pretrain.config", "configs/demo.json", "--quiet", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_mistyped_override_is_blamed_with_a_suggestion():
    """The error names the override, not the file, and suggests the key (issue 24 item 9)."""
    proc = _config_cli("train.max_steps=100", "train.max_step=3")
    assert proc.returncode == 2
    assert (
        "demo.json: override 'train.max_step=3': train: unknown key(s) ['max_step'] (did you mean 'max_steps'?)"
        in proc.stderr
    )


def test_an_error_of_the_file_is_still_blamed_on_the_file(tmp_path):
    raw = json.loads((ROOT / "configs" / "demo.json").read_text())
    raw["train"]["max_step"] = 3
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.seed=1"])
    assert str(e.value).startswith(f"{path}: train: unknown key(s) ['max_step'] (did you mean 'max_steps'?)")


def test_impossible_batch_arithmetic_and_layers_out_of_range_are_refused():
    proc = _config_cli("deepspeed.train_batch_size=7", "deepspeed.train_micro_batch_size_per_gpu=4")
    assert proc.returncode == 2
    assert "7 sequences per step is not a multiple of train_micro_batch_size_per_gpu 4" in proc.stderr
    proc = _config_cli("student.layers=[0,2,9]")
    assert proc.returncode == 2
    assert "student.layers: [9] out of range: the teacher has 6 layers" in proc.stderr


def test_the_plan_is_printed_and_a_missing_data_dir_warns(tmp_path):
    proc = _config_cli(f"data.dir={tmp_path / 'nowhere'}", "--world-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: data.dir '{tmp_path / 'nowhere'}': no manifest.json here" in proc.stderr
    # demo.json: 8 sequences per step at micro-batch 4 on 2 ranks -> no accumulation; 240 steps
    assert "micro-batch 4 sequences x accumulation 1 x 2 rank(s) = 8 sequences per step" in proc.stderr
    assert "240 steps = 1,920 sequences" in proc.stderr
    assert "student keeps teacher layers [0, 2, 4] of 6" in proc.stderr


def test_stdout_holds_only_the_resolved_config():
    """Checking the deepspeed section imports DeepSpeed, which logs to stdout on import; scripts read the resolved
    config from stdout (scripts/demo.sh), so it must parse as JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.config", "configs/demo.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["train"]["max_steps"] == 240
