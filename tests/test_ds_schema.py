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
