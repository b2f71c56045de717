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
    raw = {
        "teacher": {"name_or_path": "roberta-base"},
        "data": {"dir": "shards"},
        "train": {"output_dir": "runs/x", "max_steps": 100},
        "deepspeed": {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8},
    }
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    return raw


def build(cfg: C.RunConfig, world_size: int, *, cuda: bool) -> dict:
    """``ds_config.build`` on plain values, as the trainer calls it."""
    return D.build(cfg.deepspeed, max_steps=cfg.train.max_steps, world_size=world_size, cuda=cuda)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    cfg = C.load(path)
    assert cfg.train.max_steps >= 1 and cfg.teacher.name_or_path
    assert cfg.comment, f"{path.name} must name the source of its hyperparameters in 'comment'"
    json.dumps(cfg.to_dict())  # resolved config is JSON


@pytest.mark.parametrize(
    "name,teacher,layers,micro,accum8",
    [
        ("distilroberta.json", "roberta-base", "every_other", 16, 32),
        ("distilbert.json", "bert-base-uncased", "distilbert", 16, 32),
        ("distilroberta-large.json", "roberta-large", "distilbert", 8, 64),
    ],
)
def test_recipe_configs(name, teacher, layers, micro, accum8):
    cfg = C.load(REPO / "configs" / name)
    assert cfg.teacher.name_or_path == teacher and cfg.student.layers == layers
    assert (cfg.loss.alpha_ce, cfg.loss.alpha_mlm, cfg.loss.alpha_cos, cfg.loss.temperature) == (5.0, 2.0, 1.0, 2.0)
    ds = build(cfg, 8, cuda=True)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        4096,
        micro,
        accum8,
    )
    assert D.precision(ds) == "fp16" and ds["fp16"]["loss_scale"] == 0 and D.zero_stage(ds) == 2
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.98] and ds["gradient_clipping"] == 5.0
    assert ds["scheduler"]["type"] == "WarmupDecayLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.train.max_steps
    assert ds["scheduler"]["params"]["warmup_max_lr"] == ds["optimizer"]["params"]["lr"]
    assert build(cfg, 1, cuda=True)["gradient_accumulation_steps"] == 4096 // micro
    with pytest.raises(ConfigError, match=r"4096 .*not a multiple.*" + str(micro * 3)):
        build(cfg, 3, cuda=True)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        build(cfg, 1, cuda=False)
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


@pytest.mark.parametrize(
    "override,pattern",
    [
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
        (
            'deepspeed.scheduler={"type": "WarmupDecayLR", "params": {"warmup_num_steps": 500}}',
            r"warmup_num_steps: 500 must be an integer between 1 and the schedule's 100 steps",
        ),
        ("deepspeed.scheduler.params.warmup_num_steps=5", r"deepspeed\.scheduler\.type: missing"),
    ],
)
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
    cfg = C.load(
        path,
        [
            "train.max_steps=7",
            "loss.alpha_ce=0.5",
            "train.output_dir=runs/y z",
            "student.layers=[0, 3]",
            "deepspeed.zero_optimization.stage=3",
            "data.shuffle=false",
            "train.eval_interval=0",
        ],
    )
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
    with pytest.raises(ConfigError, match=r"masking\.mlm_mask_prop"):
        cfg.validate()


@pytest.mark.parametrize(
    "given,world,expected",
    [
        ({"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 16}, 8, (4096, 16, 32)),
        ({"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 16}, 1, (4096, 16, 256)),
        ({"train_batch_size": 64, "gradient_accumulation_steps": 4}, 2, (64, 8, 4)),
        ({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4}, 3, (96, 8, 4)),
        ({"train_batch_size": 32}, 4, (32, 8, 1)),
        ({"train_micro_batch_size_per_gpu": 8}, 2, (16, 8, 1)),
        (
            {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4},
            2,
            (64, 8, 4),
        ),
    ],
)
def test_batch_arithmetic(given, world, expected):
    plan = D.batch_sizes(given, world)
    assert tuple(plan) == expected
    assert plan.train_batch_size == plan.micro_batch * plan.accumulation * world


@pytest.mark.parametrize(
    "given,world,pattern",
    [
        (
            {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4},
            4,
            r"64 != train_micro_batch_size_per_gpu 8 x gradient_accumulation_steps 4 x world size 4 = 128",
        ),
        ({"train_batch_size": 100, "train_micro_batch_size_per_gpu": 8}, 2, r"100 sequences per step .* 16"),
        ({"train_batch_size": 30}, 4, r"30 is not a multiple of the world size 4"),
        ({"gradient_accumulation_steps": 2}, 1, r"give train_batch_size"),
    ],
)
def test_batch_arithmetic_errors(given, world, pattern):
    with pytest.raises(ConfigError, match=pattern):
        D.batch_sizes(given, world)


def test_deepspeed_defaults_fill_the_distilbert_recipe(tmp_path):
    cfg = C.load(write(tmp_path, minimal()), ["train.max_steps=1000"])
    cpu = build(cfg, 2, cuda=False)
    assert cpu["optimizer"]["type"] == "AdamW"
    p = cpu["optimizer"]["params"]
    assert (p["lr"], p["betas"], p["eps"], p["weight_decay"], p["torch_adam"]) == (5e-4, [0.9, 0.98], 1e-6, 0.0, True)
    s = cpu["scheduler"]["params"]
    assert cpu["scheduler"]["type"] == "WarmupDecayLR"
    assert (s["total_num_steps"], s["warmup_num_steps"], s["warmup_max_lr"], s["warmup_type"]) == (
        1000,
        50,
        5e-4,
        "linear",
    )
    assert cpu["gradient_clipping"] == 5.0 and D.zero_stage(cpu) == 0 and D.precision(cpu) == "fp32"
    assert (cpu["train_batch_size"], cpu["gradient_accumulation_steps"]) == (64, 4)
    gpu = build(cfg, 2, cuda=True)
    assert "torch_adam" not in gpu["optimizer"]["params"]
    # the user's values win; the section itself is not modified
    cfg2 = C.load(
        write(
            tmp_path,
            minimal(deepspeed={"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "gradient_clipping": 1.0}),
        )
    )
    ds = build(cfg2, 1, cuda=True)
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


# ------------------------------------------------------------------------------------------------------------------
# Optimizer and scheduler parameters: refused at load with the key's name, not by torch at the first step


@pytest.mark.parametrize(
    "section,pattern",
    [
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": float("nan")}}},
            r"deepspeed\.optimizer\.params\.lr: nan must be a finite number > 0",
        ),
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": -1e-4}}},
            r"deepspeed\.optimizer\.params\.lr: -0\.0001 must be a finite number > 0",
        ),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0}}}, r"deepspeed\.optimizer\.params\.lr: 0 must be"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": float("inf")}}}, r"deepspeed\.optimizer\.params\.lr: inf"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": "5e-4"}}}, r"deepspeed\.optimizer\.params\.lr: '5e-4'"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": True}}}, r"deepspeed\.optimizer\.params\.lr: True"),
        (
            {"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 1.0]}}},
            r"deepspeed\.optimizer\.params\.betas: \[0\.9, 1\.0\] must be two numbers in \[0, 1\)",
        ),
        (
            {"optimizer": {"type": "AdamW", "params": {"betas": [float("nan"), 0.98]}}},
            r"deepspeed\.optimizer\.params\.betas: \[nan, 0\.98\]",
        ),
        (
            {"optimizer": {"type": "AdamW", "params": {"betas": [0.9]}}},
            r"deepspeed\.optimizer\.params\.betas: \[0\.9\]",
        ),
        ({"optimizer": {"type": "AdamW", "params": {"eps": -1e-6}}}, r"deepspeed\.optimizer\.params\.eps: -1e-06 must"),
        ({"optimizer": {"type": "AdamW", "params": {"eps": float("nan")}}}, r"deepspeed\.optimizer\.params\.eps: nan"),
        (
            {"optimizer": {"type": "AdamW", "params": {"weight_decay": -0.01}}},
            r"deepspeed\.optimizer\.params\.weight_decay: -0\.01 must be a finite number >= 0",
        ),
        (
            {"optimizer": {"type": "AdamW", "params": {"weight_decay": float("nan")}}},
            r"deepspeed\.optimizer\.params\.weight_decay: nan",
        ),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 0}}},
            r"deepspeed\.scheduler\.params\.warmup_num_steps: 0 must be an integer between 1 and the schedule's "
            r"100 steps",
        ),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": float("nan")}}},
            r"deepspeed\.scheduler\.params\.warmup_num_steps: nan",
        ),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 0}}},
            r"deepspeed\.scheduler\.params\.total_num_steps: 0 must be a positive integer",
        ),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": float("nan")}}},
            r"deepspeed\.scheduler\.params\.total_num_steps: nan must be a positive integer",
        ),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": -1e-5}}},
            r"deepspeed\.scheduler\.params\.warmup_min_lr: -1e-05 must be a finite number >= 0",
        ),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": float("nan")}}},
            r"deepspeed\.scheduler\.params\.warmup_max_lr: nan must be a finite number > 0",
        ),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": -5e-4}}},
            r"deepspeed\.scheduler\.params\.warmup_max_lr: -0\.0005",
        ),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-4}}},
            r"deepspeed\.scheduler\.params\.warmup_min_lr: 0\.001 must be <= warmup_max_lr 0\.0001",
        ),
        (
            {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_type": "cosine"}}},
            r"deepspeed\.scheduler\.params\.warmup_type: 'cosine' is not one of \['linear', 'log'\]",
        ),
        (
            {"scheduler": {"type": "WarmupCosineLR", "params": {"cos_min_ratio": float("nan")}}},
            r"deepspeed\.scheduler\.params\.cos_min_ratio: nan",
        ),
        ({"gradient_clipping": float("inf")}, r"deepspeed\.gradient_clipping: inf must be a finite number >= 0"),
    ],
)
def test_optimizer_and_scheduler_params_are_checked_at_load(tmp_path, section, pattern):
    path = write(tmp_path, minimal(deepspeed=section))  # json.dumps writes NaN / Infinity, which json.loads reads back
    with pytest.raises(ConfigError, match=pattern) as e:
        C.load(path)
    assert str(e.value).startswith(str(path))


def test_nan_learning_rate_from_json_text_and_from_an_override(tmp_path):
    raw = minimal()
    text = json.dumps(raw).replace(
        '"deepspeed": {', '"deepspeed": {"optimizer": {"type": "AdamW", "params": {"lr": NaN}}, ', 1
    )
    path = tmp_path / "nan.json"
    path.write_text(text)
    assert json.loads(text)["deepspeed"]["optimizer"]["params"]["lr"] != 0  # NaN: Python's json module accepts it
    with pytest.raises(ConfigError, match=r"nan\.json: deepspeed\.optimizer\.params\.lr: nan must be a finite"):
        C.load(path)
    with pytest.raises(ConfigError, match=r"deepspeed\.optimizer\.params\.lr: -1\.0 must be a finite number > 0"):
        C.load(write(tmp_path, raw), ['deepspeed.optimizer={"type": "AdamW", "params": {"lr": -1.0}}'])
    with pytest.raises(ConfigError, match=r"deepspeed\.scheduler\.params\.warmup_max_lr: nan"):
        C.load(write(tmp_path, raw), ['deepspeed.scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": NaN}}'])


def test_valid_optimizer_and_scheduler_params_build_what_torch_and_deepspeed_accept(tmp_path):
    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    cfg = C.load(
        write(
            tmp_path,
            minimal(
                deepspeed={
                    "optimizer": {
                        "type": "AdamW",
                        "params": {"lr": 1e-4, "betas": [0.0, 0.999], "eps": 0, "weight_decay": 0.01},
                    },
                    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-4}},
                }
            ),
        ),
        ["train.max_steps=5"],
    )
    ds = build(cfg, 1, cuda=False)
    p, s = ds["optimizer"]["params"], ds["scheduler"]["params"]
    # 5% of 5 steps rounds to 0, which DeepSpeed refuses ("warmup_num_steps must be a positive integer"): 1 instead
    assert (s["total_num_steps"], s["warmup_num_steps"]) == (5, 1)
    opt = torch.optim.AdamW(
        [torch.nn.Parameter(torch.zeros(2))], lr=p["lr"], betas=p["betas"], eps=p["eps"], weight_decay=p["weight_decay"]
    )
    sched = WarmupDecayLR(opt, **s)
    assert sched.total_num_steps == 5


def test_build_takes_plain_values(tmp_path):
    cfg = C.load(write(tmp_path, minimal()), ["train.max_steps=400"])
    section = json.loads(json.dumps(cfg.deepspeed))
    ds = D.build(section, max_steps=400, world_size=2, cuda=False)
    assert ds["scheduler"]["params"]["total_num_steps"] == 400 and ds["gradient_accumulation_steps"] == 4
    assert section == cfg.deepspeed  # not modified
    assert D.build(section, max_steps=30, world_size=1, cuda=False)["scheduler"]["params"]["total_num_steps"] == 30
    D.check_static(section, 400)
    with pytest.raises(ConfigError, match=r"warmup_num_steps: 50 must be an integer between 1 and the schedule's 40"):
        D.check_static({**section, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 50}}}, 40)


# ------------------------------------------------------------------------------------------------------------------
# Sections are validated once, when the config is loaded


def test_each_section_validated_once_at_load(tmp_path, monkeypatch):
    calls = []
    for name, cls in C.SECTIONS.items():
        original = cls.validate
        monkeypatch.setattr(cls, "validate", lambda self, _o=original, _n=name: (calls.append(_n), _o(self))[1])
    C.load(write(tmp_path, minimal()))
    assert sorted(calls) == sorted(C.SECTIONS)


def test_schema_errors_for_a_non_object_section_and_an_optional_type():
    from pretrain.losses import LossConfig
    from pretrain.masking import MaskingConfig
    from pretrain.schema import from_dict

    with pytest.raises(ConfigError, match=r"^masking: expected an object, got \[0\.15\]$"):
        from_dict(MaskingConfig, [0.15], "masking")
    with pytest.raises(ConfigError, match=r"^loss\.relation_heads: 'four' is not a valid int or null$"):
        from_dict(LossConfig, {"relation_heads": "four"}, "loss")
    assert from_dict(MaskingConfig, None, "masking") == MaskingConfig()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_comments_attribute_the_loss_weights_to_the_reference_command(path):
    """alpha_ce 5 / alpha_mlm 2 / alpha_cos 1 are the flags of the training command in Hugging Face's
    research_projects/distillation README; train.py's own defaults are 0.5 / 0.0 / 0.0 (alpha_clm 0.5)."""
    cfg = C.load(path)
    text = " ".join(cfg.comment if isinstance(cfg.comment, list) else [cfg.comment])
    assert "train.py defaults" not in text and "train.py):" not in text
    if (cfg.loss.alpha_ce, cfg.loss.alpha_mlm, cfg.loss.alpha_cos) == (5.0, 2.0, 1.0):
        assert "README" in text, f"{path.name}: name the README command as the source of the loss weights"
