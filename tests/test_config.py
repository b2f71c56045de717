"""Run config: strict loading with file-named errors, overrides, cross-section rules, the DeepSpeed config and its batch
arithmetic, the generated reference. Fast: no models, no DeepSpeed engine."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pretrain import config as C
from pretrain import ds_config as D
from pretrain.schema import ConfigError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.json"))


def write(tmp_path: Path, raw: dict, name: str = "run.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return path


def minimal(**sections) -> dict:
    raw = {"teacher": {"name_or_path": "roberta-base"}, "data": {"dir": "shards"},
           "train": {"output_dir": "runs/x", "max_steps": 100},
           "deepspeed": {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return raw


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    cfg = C.load(path)
    assert cfg.train.max_steps >= 1 and cfg.teacher.name_or_path
    assert cfg.comment, f"{path.name} must name the source of its hyperparameters in 'comment'"
    json.dumps(cfg.to_dict())  # resolved config is JSON


@pytest.mark.parametrize("name,teacher,layers,micro,accum8", [
    ("distilroberta.json", "roberta-base", "every_other", 16, 32),
    ("distilbert.json", "bert-base-uncased", "distilbert", 16, 32),
    ("distilroberta-large.json", "roberta-large", "distilbert", 8, 64)])
def test_recipe_configs(name, teacher, layers, micro, accum8):
    cfg = C.load(REPO / "configs" / name)
    assert cfg.teacher.name_or_path == teacher and cfg.student.layers == layers
    assert (cfg.loss.alpha_ce, cfg.loss.alpha_mlm, cfg.loss.alpha_cos, cfg.loss.temperature) == (5.0, 2.0, 1.0, 2.0)
    ds = D.build(cfg, 8, cuda=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (4096, micro, accum8)
    assert D.precision(ds) == "fp16" and ds["fp16"]["loss_scale"] == 0 and D.zero_stage(ds) == 2
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.98] and ds["gradient_clipping"] == 5.0
    assert ds["scheduler"]["type"] == "WarmupDecayLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.train.max_steps
    assert ds["scheduler"]["params"]["warmup_max_lr"] == ds["optimizer"]["params"]["lr"]
    assert D.build(cfg, 1, cuda=True)["gradient_accumulation_steps"] == 4096 // micro
    with pytest.raises(ConfigError, match=r"4096 .*not a multiple.*" + str(micro * 3)):
        D.build(cfg, 3, cuda=True)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        D.build(cfg, 1, cuda=False)
    if name == "distilbert.json":
        assert cfg.student.architecture == "distilbert"


def test_unknown_key_names_file_key_and_valid_keys(tmp_path):
    path = write(tmp_path, minimal(train={"max_step": 5}))
    with pytest.raises(ConfigError) as e:
        C.load(path)
    msg = str(e.value)
    assert str(path) in msg and "train" in msg and "max_step" in msg and "max_steps" in msg


def test_unknown_section_and_missing_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trian'\]"):
        C.load(write(tmp_path, {**minimal(), "trian": {}}))
    raw = minimal()
    del raw["teacher"]
    with pytest.raises(ConfigError, match=r"required section\(s\) \['teacher'\]"):
        C.load(write(tmp_path, raw))


@pytest.mark.parametrize("override,pattern", [
    ("train.max_steps=ten", r"train\.max_steps: expected an integer, got 'ten'"),
    ("train.max_steps=0", r"train\.max_steps: 0 must be >= 1"),
    ("masking.mlm_mask_prop=1.5", r"masking\.mlm_mask_prop: 1\.5"),
    ("loss.temperature=-1", r"loss\.temperature"),
    ("train.keep_last=0", r"train\.keep_last"),
    ("student.layers=sometimes", r"student\.layers"),
    ("teacher.dtype=float8", r"teacher\.dtype: 'float8' is not one of"),
    ("deepspeed.zero_optimization.stage=4", r"deepspeed\.zero_optimization\.stage: 4"),
    ("deepspeed.train_micro_batch_size_per_gpu=0", r"deepspeed\.train_micro_batch_size_per_gpu: 0"),
    ("deepspeed.bf16.enabled=true", r"fp16 and bf16 are both enabled"),
    ("deepspeed.gradient_accumulation_steps=3", r"deepspeed\.train_batch_size: 64 is not micro 8 x accumulation 3"),
    ('deepspeed.scheduler={"type": "WarmupDecayLR", "params": {"warmup_num_steps": 500}}',
     r"warmup_num_steps: 500 must be an integer between 0 and the schedule's 100 steps"),
    ('deepspeed.scheduler.params.warmup_num_steps=5', r"deepspeed\.scheduler\.type: missing"),
])
def test_bad_values_name_file_key_and_value(tmp_path, override, pattern):
    path = write(tmp_path, minimal(deepspeed={"fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=pattern) as e:
        C.load(path, [override])
    assert str(e.value).startswith(str(path))


def test_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"teacher": {"name_or_path": "x"},\n  "train": {"max_steps": 3,}}')
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 2 column"):
        C.load(bad)
    with pytest.raises(ConfigError, match=r"nope\.json: config file not found"):
        C.load(tmp_path / "nope.json")


def test_overrides_types_and_nesting(tmp_path):
    path = write(tmp_path, minimal())
    cfg = C.load(path, ["train.max_steps=7", "loss.alpha_ce=0.5", "train.output_dir=runs/y z",
                        "student.layers=[0, 3]", "deepspeed.zero_optimization.stage=3", "data.shuffle=false",
                        "train.eval_interval=0"])
    assert cfg.train.max_steps == 7 and cfg.loss.alpha_ce == 0.5 and cfg.train.output_dir == "runs/y z"
    assert cfg.student.layers == [0, 3] and cfg.deepspeed["zero_optimization"]["stage"] == 3
    assert cfg.data.shuffle is False and cfg.train.eval_interval == 0
    for bad in ("train.max_steps", "max_steps=3"):
        with pytest.raises(ConfigError, match="override"):
            C.load(path, [bad])


def test_comment_keys_are_documented_and_kept(tmp_path):
    for key in ("comment", "_source"):
        cfg = C.load(write(tmp_path, {key: ["Sanh et al. 2019"], **minimal()}))
        assert cfg.comment == ["Sanh et al. 2019"] and cfg.to_dict()["comment"] == ["Sanh et al. 2019"]
    assert "`comment`" in C.reference_markdown()


def test_cross_section_rule(tmp_path):
    # a logit loss needs masked tokens; the masking section alone accepts any positive proportion
    cfg = C.load(write(tmp_path, minimal()))
    cfg.masking = dataclasses.replace(cfg.masking)
    object.__setattr__(cfg.masking, "mlm_mask_prop", 0.0)
    with pytest.raises(ConfigError, match="masking.mlm_mask_prop"):
        cfg.validate()


@pytest.mark.parametrize("given,world,expected", [
    ({"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 16}, 8, (4096, 16, 32)),
    ({"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 16}, 1, (4096, 16, 256)),
    ({"train_batch_size": 64, "gradient_accumulation_steps": 4}, 2, (64, 8, 4)),
    ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 3, (96, 8, 4)),
    ({"train_batch_size": 32}, 4, (32, 8, 1)),
    ({"train_micro_batch_size_per_gpu": 8}, 2, (16, 8, 1)),
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 2, (64, 8, 4)),
])
def test_batch_arithmetic(given, world, expected):
    plan = D.batch_sizes(given, world)
    assert tuple(plan) == expected
    assert plan.train_batch_size == plan.micro_batch * plan.accumulation * world


@pytest.mark.parametrize("given,world,pattern", [
    ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 4,
     r"64 != train_micro_batch_size_per_gpu 8 x gradient_accumulation_steps 4 x world size 4 = 128"),
    ({"train_batch_size": 100, "train_micro_batch_size_per_gpu": 8}, 2, r"100 sequences per step .* 16"),
    ({"train_batch_size": 30}, 4, r"30 is not a multiple of the world size 4"),
    ({"gradient_accumulation_steps": 2}, 1, r"give train_batch_size"),
])
def test_batch_arithmetic_errors(given, world, pattern):
    with pytest.raises(ConfigError, match=pattern):
        D.batch_sizes(given, world)


def test_deepspeed_defaults_fill_the_distilbert_recipe(tmp_path):
    cfg = C.load(write(tmp_path, minimal()), ["train.max_steps=1000"])
    cpu = D.build(cfg, 2, cuda=False)
    assert cpu["optimizer"]["type"] == "AdamW"
    p = cpu["optimizer"]["params"]
    assert (p["lr"], p["betas"], p["eps"], p["weight_decay"], p["torch_adam"]) == (5e-4, [0.9, 0.98], 1e-6, 0.0, True)
    s = cpu["scheduler"]["params"]
    assert cpu["scheduler"]["type"] == "WarmupDecayLR"
    assert (s["total_num_steps"], s["warmup_num_steps"], s["warmup_max_lr"], s["warmup_type"]) == \
        (1000, 50, 5e-4, "linear")
    assert cpu["gradient_clipping"] == 5.0 and D.zero_stage(cpu) == 0 and D.precision(cpu) == "fp32"
    assert (cpu["train_batch_size"], cpu["gradient_accumulation_steps"]) == (64, 4)
    gpu = D.build(cfg, 2, cuda=True)
    assert "torch_adam" not in gpu["optimizer"]["params"]
    # the user's values win; the section itself is not modified
    cfg2 = C.load(write(tmp_path, minimal(deepspeed={"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                                                    "gradient_clipping": 1.0})))
    ds = D.build(cfg2, 1, cuda=True)
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and ds["scheduler"]["params"]["warmup_max_lr"] == 1e-4
    assert ds["gradient_clipping"] == 1.0 and "scheduler" not in cfg2.deepspeed


def test_reference_covers_every_field(capsys):
    assert C.main(["--reference"]) == 0
    text = capsys.readouterr().out
    for name, cls in C.SECTIONS.items():
        assert f"### `{name}`" in text
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f"{name}.{f.name} missing from the reference"
    assert "### `deepspeed`" in text and "train_batch_size" in text


def test_cli_validates_and_prints_resolved_config(tmp_path, capsys):
    path = write(tmp_path, minimal())
    assert C.main([str(path), "train.max_steps=9"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["max_steps"] == 9
    assert C.main([str(path), "train.max_steps=-1"]) == 2
    assert "train.max_steps" in capsys.readouterr().err
