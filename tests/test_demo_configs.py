"""The demo's configs with their real embedded teachers: configs/demo.json (all-MiniLM-L6-v2 -> 3 layers, the
representation losses) and configs/embedded-mlm.json (bert-tiny-mlm -> 1 layer, the full DistilBERT recipe). Each loads
and says what the demo relies on, then trains a few steps in this process on shards prepared here from a slice of the
embedded corpus (the first Wikipedia extracts), with the teacher's tokenizer, as scripts/demo.sh does.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from pretrain import ds_config
from pretrain.config import load
from tests.helpers import REPO, read_metrics, train_in_process

DEMO = REPO / "configs" / "demo.json"
MLM = REPO / "configs" / "embedded-mlm.json"
SEQ = 64  # tokens per sequence of the test shards (the demo uses 128)
DOCUMENTS = 400  # Wikipedia extracts in the slice


@functools.cache
def shards(teacher: str) -> Path:
    """Shards of the first DOCUMENTS Wikipedia extracts, made with ``teacher``'s tokenizer by the data_prep CLI."""
    from data_prep.__main__ import main
    from data_prep.embedded import fetch_embedded

    root = Path(tempfile.mkdtemp(prefix="demo-shards-"))
    atexit.register(shutil.rmtree, root, True)
    wiki = json.loads(fetch_embedded(names=["wikipedia"])["wikipedia"].read_text(encoding="utf-8"))
    slice_file = root / "slice.jsonl"
    slice_file.write_text("".join(json.dumps({"text": e["extract"]}) + "\n" for e in list(wiki.values())[:DOCUMENTS]))
    out = root / "shards"
    assert (
        main(
            [
                "prepare",
                "--source",
                f"jsonl:{slice_file}",
                "--tokenizer",
                teacher,
                "--max-seq-length",
                str(SEQ),
                "--valid-fraction",
                "0.1",
                "--output",
                str(out),
                "--num-proc",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def overrides(cfg, out: Path, steps: int, **extra) -> list[str]:
    items = {
        "data.dir": str(shards(cfg.teacher.name_or_path)),
        "train.output_dir": str(out),
        "train.max_steps": steps,
        "train.log_interval": 1,
        "train.eval_interval": 0,
        "train.eval_sequences": 16,
        "train.save_interval": 0,
        "train.tensorboard": False,
        "deepspeed.train_batch_size": 8,
        "deepspeed.train_micro_batch_size_per_gpu": 4,
        "deepspeed.scheduler.params.warmup_num_steps": 1,
        **extra,
    }
    return [f"{k}={json.dumps(v)}" for k, v in items.items()]


def safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_demo_config_is_the_representation_recipe():
    cfg = load(DEMO)
    assert cfg.teacher.name_or_path == "embedded:minilm-l6"
    assert (cfg.student.layers, cfg.student.architecture, cfg.student.init) == ("every_other", "same", "teacher")
    assert cfg.train.output_dir == "runs/demo"
    active = cfg.loss.active()
    assert set(active) == {"cos", "mse", "att", "pool"}  # no logit terms: the teacher has no MLM head
    assert active["pool"] > 10 * max(active["cos"], active["mse"], active["att"])  # docs/demo.md: pooled MSE leads
    cfg.loss.check_models(teacher_has_mlm_head=False, student_has_mlm_head=False)
    for world in (1, 2):  # 2 CPU ranks (the demo) or one GPU: the batch arithmetic holds
        built = ds_config.build(cfg.deepspeed, max_steps=cfg.train.max_steps, world_size=world, cuda=False)
        assert built["train_batch_size"] == cfg.deepspeed["train_batch_size"]


def test_demo_masking_leaves_the_inputs_intact():
    """The demo's teacher is a sentence encoder: its inputs stay uncorrupted (docs/demo.md, masking experiment)."""
    from pretrain.masking import Masker

    cfg = load(DEMO)
    masker = Masker(cfg.masking, vocab_size=100, special_ids=[0, 1, 2, 3], mask_token_id=3, pad_token_id=0, seed=1)
    ids = torch.randint(4, 100, (4, 32))
    ids[:, 0], ids[:, -1] = 1, 2
    attn = torch.ones_like(ids)
    masked, labels = masker(ids, attn, step=0, rank=0, micro_step=0)
    assert (labels != -100).any()
    assert torch.equal(masked, ids)


def test_embedded_mlm_config_is_the_distilbert_recipe():
    cfg = load(MLM)
    assert cfg.teacher.name_or_path == "embedded:bert-tiny-mlm"
    assert cfg.loss.active() == {"ce": 5.0, "mlm": 2.0, "cos": 1.0}  # DistilBERT's weights
    assert cfg.loss.temperature == 2.0 and cfg.loss.restrict_ce_to_mask
    assert (cfg.masking.mlm_mask_prop, cfg.masking.word_mask, cfg.masking.word_keep) == (0.15, 0.8, 0.1)


@pytest.mark.slow
def test_embedded_mlm_trains_with_its_real_teacher(tmp_path):
    from transformers import AutoModelForMaskedLM

    from data_prep.embedded import resolve_model

    cfg = load(MLM)
    out = tmp_path / "run"
    cfg = load(MLM, overrides(cfg, out, steps=3, **{"train.eval_interval": 3}))
    trainer = train_in_process(cfg)
    assert trainer.student_record["layer_map"] == [0]
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("loss_ce", "loss_mlm", "loss_cos")), r
        assert abs(r["loss"] - (5 * r["loss_ce"] + 2 * r["loss_mlm"] + r["loss_cos"])) < 1e-3 * r["loss"]
    # 15% of the real tokens are masked (CLS / SEP of each sequence are never chosen)
    assert 0.12 < recs[-1]["masked_tokens_seen"] / recs[-1]["tokens_seen"] < 0.16
    valid = read_metrics(out, "valid")[-1]
    assert valid["step"] == 3 and 0 <= valid["mlm_accuracy"] <= 1 and 0 <= valid["agreement"] <= 1
    assert math.isfinite(valid["kl_to_teacher"]) and valid["kl_to_teacher"] > 0
    # student_init is the teacher's embeddings + layer 0 + MLM head, exactly; training moved it
    student = AutoModelForMaskedLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 1 and type(student).__name__ == "BertForMaskedLM"
    teacher = safetensors(Path(resolve_model("embedded:bert-tiny-mlm")))
    init, final = safetensors(out / "student_init"), safetensors(out / "student")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(init[key], teacher[key])
    assert not torch.equal(final[key], init[key])


@pytest.mark.slow
def test_demo_config_trains_with_its_real_teacher(tmp_path):
    from transformers import AutoModel

    from data_prep.embedded import resolve_model
    from pretrain.evaluate import pooling_mode

    cfg = load(DEMO)
    out = tmp_path / "run"
    cfg = load(DEMO, overrides(cfg, out, steps=2))
    trainer = train_in_process(cfg)
    assert trainer.student_record["layer_map"] == [0, 2, 4]
    assert trainer.model.layer_pairs == [[1, 2], [2, 4], [3, 6]]  # TinyBERT's uniform map
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2]
    active = cfg.loss.active()
    for r in recs:
        assert all(math.isfinite(r[f"loss_{k}"]) and r[f"loss_{k}"] > 0 for k in active), r
        assert abs(r["loss"] - sum(a * r[f"loss_{k}"] for k, a in active.items())) < 1e-3 * r["loss"]
    student = AutoModel.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 3 and student.config.hidden_size == 384
    assert pooling_mode(str(out / "student")) == ("mean", True)  # the sentence-transformers files came along
    teacher = safetensors(Path(resolve_model("embedded:minilm-l6")))
    init = safetensors(out / "student_init")
    for i, t in enumerate([0, 2, 4]):
        name = "encoder.layer.{}.output.dense.weight"
        assert torch.equal(init[name.format(i)], teacher[name.format(t)])
