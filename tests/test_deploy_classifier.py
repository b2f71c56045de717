"""The task-demo's deployment rows on a tiny classifier: ONNX logits vs PyTorch at batch 1 and 32, the int8 verdict on
dev and test, a forced failing conversion reported as failing, the interleaved speed records, and a width-pruned
classifier that reloads and keeps its head's channels (pretrain/deploy/classifier.py, compare.py,
pretrain/tasks/prune_task.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pretrain.deploy import classifier as dc
from pretrain.deploy.compare import classifier_runners, interleaved_speed, speed_markdown
from pretrain.deploy.verify import OnnxRunner, tokenize
from pretrain.tasks.base import CLASSIFICATION, Split, Task
from tests import tiny


def _task() -> Task:
    """A 2-class task on the tiny corpus: label = whether the line mentions a word of the first half of the lines."""
    lines = [t for t in tiny.TEXT if t.strip()]
    texts = [" ".join(lines[i % len(lines)].split()[: 3 + (7 * i) % 13]) for i in range(48)]  # mixed lengths
    labels = np.asarray([i % 2 for i in range(48)], dtype=np.int64)
    splits = {s: Split(texts[k::3], labels[k::3]) for k, s in enumerate(("train", "dev", "test"))}
    return Task("tiny:parity", CLASSIFICATION, ("accuracy",), splits, "dev", ("test",), ["a", "b"], "local", {})


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory):
    """A tiny BertForSequenceClassification (2 layers, hidden 64, 4 heads of 16) with its tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = tiny.bert_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=160,
        pad_token_id=tok.pad_token_id,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    return tiny.save_model_dir(tmp_path_factory.mktemp("cls") / "model", model, tok)


@pytest.fixture(scope="module")
def exported(cls_dir):
    return dc.export_classifier(cls_dir, _task(), exporter="torchscript")


def test_onnx_logits_match_pytorch_at_batch_1_and_32(exported, cls_dir):
    fp32_check = exported.checks[0]
    assert fp32_check.passed and set(fp32_check.detail) == {"batch1", "batch32"}
    assert fp32_check.value <= 1e-4
    # independently: a batch of 32 texts of mixed lengths, padded, through the file and through PyTorch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cls_dir)
    model = AutoModelForSequenceClassification.from_pretrained(cls_dir).eval()
    texts = (_task().splits["dev"].texts * 3)[:32]
    enc = tokenize(tok, texts)
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 3  # mixed lengths, padding in play
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
    got = OnnxRunner(exported.files["fp32"])(enc)
    assert got.shape == (32, 2) and float(np.abs(got - ref).max()) <= 1e-4
    one = {k: v[:1, : int(enc["attention_mask"][0].sum())] for k, v in enc.items()}
    assert float(np.abs(OnnxRunner(exported.files["fp32"])(one) - ref[:1]).max()) <= 1e-4


def test_int8_verdict_on_dev_and_test(exported):
    check = exported.checks[1]
    assert set(check.detail["drop_points"]) == {"dev", "test"}
    for split in ("dev", "test"):
        f, q = check.detail["fp32"][split], check.detail["int8"][split]
        assert 0.0 <= f <= 1.0 and 0.0 <= q <= 1.0
        assert check.detail["drop_points"][split] == pytest.approx(100 * (f - q))
    assert check.value == max(check.detail["drop_points"].values())
    assert check.passed == (check.value <= 1.0)
    assert exported.scores["fp32"] == check.detail["fp32"]
    written = json.loads((exported.out_dir / "checks.json").read_text())
    assert [c["passed"] for c in written] == [c.passed for c in exported.checks]
    assert exported.files["int8"].is_file() and exported.files["int8"].parent == exported.out_dir


def test_a_conversion_that_loses_accuracy_is_reported_as_failing(cls_dir, tmp_path):
    """The 'int8' model here has its class logits swapped (the classifier rows exchanged before export), so its
    accuracy is 100 - fp32's: the check must fail with that drop (and the files are still written)."""
    from transformers import AutoModelForSequenceClassification

    from pretrain.deploy.onnx_export import export_model

    def broken(fp32, out):
        model = AutoModelForSequenceClassification.from_pretrained(cls_dir).eval()
        with torch.no_grad():
            model.classifier.weight.copy_(model.classifier.weight.flip(0))
            model.classifier.bias.copy_(model.classifier.bias.flip(0))
        return export_model(model, "classifier", out, exporter="torchscript")

    task = _task()
    task.splits["dev"].labels[:] = 0  # a constant-label split: fp32 and swapped predictions differ in accuracy
    res = dc.export_classifier(cls_dir, task, tmp_path / "onnx", exporter="torchscript", quantize=broken)
    check = res.checks[1]
    assert not check.passed and not res.passed
    assert check.value > 1.0
    assert "FAIL" in check.line()
    assert json.loads((tmp_path / "onnx/checks.json").read_text())[1]["passed"] is False


def test_interleaved_speed_records_and_speedups(exported, cls_dir):
    onnx = {"fp32": exported.files["fp32"], "int8": exported.files["int8"]}
    runners = classifier_runners(cls_dir, onnx, threads=1)
    records = interleaved_speed(
        {"teacher": runners, "student": runners},
        threads=1,
        batches=(1, 32),
        seq_len=16,
        rounds=2,
        warmup=1,
        repeats={1: 2, 32: 1},
    )
    assert len(records) == 2 * 3 * 2
    for r in records:
        assert r["p50_ms"] > 0 and r["p95_ms"] >= r["p50_ms"] and r["throughput_seq_s"] > 0
        if r["model"] == "teacher":
            assert r["speedup_same_runtime"] == pytest.approx(1.0)
            if r["runtime"] == "pytorch-fp32":
                assert r["speedup_vs_pytorch_teacher"] == pytest.approx(1.0)
    table = speed_markdown(records)
    assert "onnxruntime-int8" in table and "threads" in table
    with pytest.raises(KeyError, match="teacher"):
        interleaved_speed({"student": runners}, rounds=1)


def test_pruned_classifier_reloads_with_its_head(cls_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from pretrain.tasks.prune_task import prune_classifier

    record = prune_classifier(
        cls_dir, tmp_path / "p", _task(), layers=[1], hidden_size=32, intermediate_size=64, calibration=8
    )
    src = AutoModelForSequenceClassification.from_pretrained(cls_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "p")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.num_hidden_layers) == (32, 2, 64, 1)
    ch = record["prune"]["hidden_channels"]
    assert torch.equal(model.classifier.weight, src.classifier.weight[:, ch])
    assert torch.equal(model.bert.pooler.dense.weight, src.bert.pooler.dense.weight[ch][:, ch])
    assert cfg.id2label == src.config.id2label
    assert json.loads((tmp_path / "p/prune.json").read_text())["layer_map"] == [1]


def _export_json(fp32: dict, int8: dict, diff: float = 1e-6, tol: float = 1.0) -> dict:
    drop = dc.check_task_int8(fp32, int8, "b", tol).value
    checks = [
        {"value": diff, "tolerance": 1e-4, "passed": diff <= 1e-4},
        {"value": drop, "tolerance": tol, "passed": drop <= tol},
    ]
    return {
        "model_dir": "m",
        "files": {"fp32": "a", "int8": "b"},
        "sizes": {"fp32": 10, "int8": 4},
        "checks": checks,
        "scores": {"fp32": fp32, "int8": int8},
        "passed": all(c["passed"] for c in checks),
    }


def test_deploy_rows_table_and_moonshot_verdict():
    """Seeds' mean / std in points, the worst check per row, and the target's shortfall from the int8 speed-ups."""
    from pretrain.tasks.deploy_rows import markdown, moonshot_lines, summarise_row

    teacher = summarise_row("teacher", [_export_json({"dev": 0.80, "test": 0.80}, {"dev": 0.80, "test": 0.79})])
    student = summarise_row(
        "student",
        [
            _export_json({"dev": 0.80, "test": 0.79}, {"dev": 0.80, "test": 0.79}),
            _export_json({"dev": 0.78, "test": 0.77}, {"dev": 0.76, "test": 0.77}),  # int8 drops 2 points on dev
        ],
    )
    assert student["accuracy"]["int8"]["test"] == pytest.approx((78.0, 1.4142135), rel=1e-5)
    assert student["int8_max_drop_points"] == pytest.approx(2.0) and not student["int8_passed"]
    assert teacher["int8_passed"] and student["fp32_passed"]  # a drop of exactly 1.0 point (0.80 -> 0.79) passes
    speed = [
        {
            "model": m,
            "runtime": rt,
            "batch": b,
            "throughput_seq_s": 1.0,
            "p50_ms": 1.0,
            "p95_ms": 2.0,
            "speedup_same_runtime": up,
            "speedup_vs_pytorch_teacher": up,
            "cpu": "c",
            "isa": "i",
            "threads": 2,
            "seq_len": 128,
            "rounds": 1,
            "loadavg_1m": 0.0,
        }
        for m, up in (("teacher", 1.0), ("student", 4.5))
        for rt in ("pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8")
        for b in (1, 32)
    ]
    table = markdown([teacher, student], speed)
    assert "FAIL drop 2.00 pt" in table and "PASS max abs logit diff" in table
    (line,) = moonshot_lines([teacher, student], speed, 0.99, 4.0)
    # 78.0 / 80.0 = 97.5% of the fp32 teacher: 1.5 points short; 4.5x at both batches meets the speed
    assert "97.5%" in line and "share 1.5 points below 99%" in line and "speed-up" not in line.split("missed")[1]
    speed[-1]["speedup_same_runtime"] = 3.0  # student int8 at batch 32
    (line,) = moonshot_lines([teacher, student], speed, 0.99, 4.0)
    assert "speed-up 1.00x below 4x" in line
