"""pretrain.evaluate / pretrain.report: real metric values on tiny models and a small held-out split.

Models (tests/tiny.py): a 4-layer random BERT teacher with MLM head, a student copied from its layers 0 and 2
(pretrain.student.build_student), a random-init 2-layer student, and the teacher itself as a "student".
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM

from data_prep.prepare import PrepareConfig, prepare
from data_prep.shards import ShardedTokens
from pretrain import evaluate as ev
from pretrain.masking import Masker
from pretrain.metrics import read_metrics
from pretrain.report import curve_keys, plot_loss_curves
from pretrain.student import StudentConfig, build_student
from tests import tiny
from tests.helpers import assert_effect, torch_threads

SEQ = 48  # max_seq_length of the shards


def _manifest(tok, valid_sequences):
    """A minimal manifest (for the error cases only: a split without sequences)."""
    return {
        "format_version": 1,
        "max_seq_length": SEQ,
        "dtype": "uint16",
        "tokenizer": {
            "name_or_path": "tiny-bert",
            "vocab_size": len(tok),
            "cls_token_id": tok.cls_token_id,
            "sep_token_id": tok.sep_token_id,
            "pad_token_id": tok.pad_token_id,
            "mask_token_id": tok.mask_token_id,
        },
        "splits": {
            "train": {"num_sequences": 10, "shards": []},
            "valid": {"num_sequences": valid_sequences, "shards": []},
        },
    }


def _documents(n=80, seed=0):
    """Distinct documents (text) whose two halves hold the same bag of words in different orders (so retrieval
    works lexically even for a random model) and differ between documents."""
    words = sorted({w.strip(".,:;'").lower() for line in tiny.TEXT for w in line.split()} - {""})
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        bag = list(rng.choice(words, 8, replace=False))
        docs.append(" ".join(rng.permutation(bag)) + " " + " ".join(rng.permutation(bag)))
    return docs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Model dirs (teacher, copied student, random student in RUN/), RUN/metrics.jsonl in the trainer's format with
    a torn last line, and real shards (data_prep.prepare, half of 80 documents held out)."""
    root = tmp_path_factory.mktemp("eval")
    tok = tiny.bert_tokenizer()
    teacher = tiny.bert_model(tok, layers=4, hidden=32)
    copied, _ = build_student(teacher, StudentConfig(layers=[0, 2]))
    random_student = tiny.bert_model(tok, layers=2, hidden=32, seed=1)
    run = root / "run"
    dirs = {
        "teacher": tiny.save_model_dir(root / "teacher", teacher, tok),
        "student": tiny.save_model_dir(run / "student", copied.eval(), tok),
        "student_init": tiny.save_model_dir(run / "student_init", random_student, tok),
    }
    records = [
        {
            "split": "train",
            "step": s,
            "loss": 5.0 / s,
            "loss_ce": 3.0 / s,
            "loss_mlm": 1.5 / s,
            "loss_cos": 0.5 / s,
            "loss_scale": 1.0,
            "lr": 1e-4,
            "grad_norm": None,
        }
        for s in range(1, 21)
    ]
    records += [
        {
            "split": "valid",
            "step": s,
            "mlm_loss": 4.0 / s,
            "perplexity": math.exp(4.0 / s),
            "agreement": 0.5,
            "hidden_cosine": 0.9,
            "sequences": 8,
        }
        for s in (10, 20)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 21, "lo')
    (root / "docs.txt").write_text("\n\n".join(_documents()) + "\n")
    data = root / "data"
    prepare(
        PrepareConfig(
            sources=[f"text:{root / 'docs.txt'}"],
            tokenizer=str(dirs["teacher"]),
            max_seq_length=SEQ,
            output=str(data),
            valid_fraction=0.5,
            num_proc=0,
            progress=False,
        )
    )
    return {"root": root, "tok": tok, "dirs": dirs, "run": run, "data": data, "valid": ShardedTokens(data, "valid")}


KW: dict[str, Any] = {"bench_batch": 4, "bench_length": 16, "bench_warmup": 1, "bench_iters": 2, "batch_size": 16}


@pytest.fixture(scope="module")
def report(setup):
    """Teacher vs copied student, random student found as STUDENT/../student_init."""
    return ev.evaluate(
        str(setup["dirs"]["student"]), str(setup["dirs"]["teacher"]), setup["data"], setup["root"] / "out", **KW
    )


METRICS = (
    "params",
    "tokens_per_s",
    "speedup",
    "recall_at_1",
    "embedding_cosine",
    "mlm_loss",
    "perplexity",
    "mlm_accuracy",
    "kl_to_teacher",
    "agreement",
)


def test_report_keys_and_files(setup, report):
    out = setup["root"] / "out"
    saved = json.loads((out / "report.json").read_text())
    assert set(saved) == {"teacher", "student_init", "student", "meta"}
    for name in ("teacher", "student_init", "student"):
        assert set(saved[name]) == set(METRICS), name
        assert all(isinstance(saved[name][k], (int, float)) for k in METRICS)
    meta = saved["meta"]
    assert meta["paths"]["student_init"] == str(setup["dirs"]["student_init"])  # found next to the student
    docs = list(setup["valid"].documents())
    assert 20 <= meta["retrieval"]["num_documents"] == len(docs) and meta["mlm"]["num_sequences"] == len(setup["valid"])
    assert meta["throughput"] == {"batch_size": 4, "seq_length": 16, "warmup": 1, "iters": 2}
    assert meta["metrics_file"] == str(setup["run"] / "metrics.jsonl")
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "![loss curves](loss_curves.png)" in md
    assert f"| MLM loss (nats / masked token) | {saved['teacher']['mlm_loss']:.4f} |" in md
    assert not list(out.glob(".*tmp*"))  # no temporary files left


def test_teacher_reference_values(setup, report):
    t = report["teacher"]
    assert t["kl_to_teacher"] == 0.0 and t["agreement"] == 1.0 and t["speedup"] == 1.0
    assert t["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)
    chance = 1 / report["meta"]["retrieval"]["num_documents"]
    assert_effect("teacher recall@1 - chance", t["recall_at_1"] - chance, 0.45, t)
    assert t["perplexity"] == pytest.approx(math.exp(t["mlm_loss"]))
    teacher = AutoModelForMaskedLM.from_pretrained(setup["dirs"]["teacher"]).eval()
    assert report["teacher"]["params"] == sum(p.numel() for p in teacher.bert.parameters())
    # Independent recomputation of the MLM loss / accuracy: full logits of the plain model, same masking.
    masker = Masker.from_tokenizer(ev.MASKING, setup["tok"], token_counts=None, seed=0)
    seqs = [np.asarray(s, dtype=np.int64) for s in setup["valid"]]
    nll, correct, n = 0.0, 0, 0
    for bi, start in enumerate(range(0, len(seqs), KW["batch_size"])):
        ids, attn = ev.pad_batch(seqs[start : start + KW["batch_size"]], setup["tok"].pad_token_id, torch.device("cpu"))
        masked, labels = masker(ids, attn, step=bi, rank=0, micro_step=0)
        with torch.no_grad():
            logits = teacher(input_ids=masked, attention_mask=attn).logits
        sel = labels != -100
        nll += torch.nn.functional.cross_entropy(logits[sel], labels[sel], reduction="sum").item()
        correct += (logits[sel].argmax(-1) == labels[sel]).sum().item()
        n += int(sel.sum())
    assert n == report["meta"]["mlm"]["num_masked"]
    assert t["mlm_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert t["mlm_accuracy"] == pytest.approx(correct / n)


def test_copied_student_beats_random_student(report):
    copied, rand = report["student"], report["student_init"]
    assert copied["params"] == rand["params"] < report["teacher"]["params"]
    assert copied["kl_to_teacher"] > 0
    assert_effect("KL to teacher: random - copied", rand["kl_to_teacher"] - copied["kl_to_teacher"], 0.0)
    assert_effect("agreement: copied - random", copied["agreement"] - rand["agreement"], 0.0)
    assert_effect("embedding cosine: copied - random", copied["embedding_cosine"] - rand["embedding_cosine"], 0.0)


def test_student_that_is_the_teacher_matches_and_previous_report_is_kept(setup, report, caplog):
    out = setup["root"] / "out-again"
    out.mkdir()
    first = (setup["root"] / "out" / "report.json").read_text()
    (out / "report.json").write_text(first)
    with caplog.at_level("WARNING", logger="pretrain.evaluate"):
        again = ev.evaluate(
            str(setup["dirs"]["teacher"]),
            str(setup["dirs"]["teacher"]),
            setup["data"],
            out,
            student_init=str(setup["dirs"]["student"]),
            **KW,
        )
    assert "report.prev.json" in caplog.text
    assert (out / "report.prev.json").read_text() == first
    for key in set(METRICS) - {"tokens_per_s", "speedup"}:
        assert again["student"][key] == again["teacher"][key], key
    assert again["student_init"]["kl_to_teacher"] == pytest.approx(report["student"]["kl_to_teacher"], rel=1e-6)


def test_embedding_ignores_padding_and_recall(setup, capsys):
    m = ev.load_model(
        "t",
        str(setup["dirs"]["teacher"]),
        ev._load_config("--teacher", str(setup["dirs"]["teacher"])),
        torch.device("cpu"),
    )
    short, long = np.arange(5, 12), np.arange(20, 45)
    alone = ev.embed(m, [short], pad_id=0, batch_size=2, pooling="mean", device=torch.device("cpu"))
    capsys.readouterr()
    padded = ev.embed(m, [short, long], pad_id=0, batch_size=2, pooling="mean", device=torch.device("cpu"))
    err = capsys.readouterr().err  # the progress bar (issue 24 item 10): every batch of the total
    assert "evaluate: embed t: 100%" in err and "1/1" in err
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)
    assert padded[0].norm().item() == pytest.approx(1.0, abs=1e-6)
    q = torch.eye(4)
    assert ev.recall_at_1(q, q) == 1.0
    assert ev.recall_at_1(q, q[[1, 0, 2, 3]]) == 0.5


def test_split_halves_and_document_sample():
    first, second = ev.split_halves(np.arange(10, 31), max_content=100, cls_id=2, sep_id=3)
    assert first.tolist() == [2, *range(10, 20), 3] and second.tolist() == [2, *range(20, 31), 3]
    first, second = ev.split_halves(np.arange(100), max_content=8, cls_id=2, sep_id=3)  # capped to 16 tokens
    assert first.tolist() == [2, *range(8), 3] and second.tolist() == [2, *range(8, 16), 3]
    docs = [np.arange(n) for n in [3, 20, 5, 30, 40, 17, 16, 50] * 5]
    picked, eligible = ev.sample_documents(iter(docs), k=6, min_tokens=16, seed=0)
    assert eligible == 30 and len(picked) == 6 and all(len(d) >= 16 for d in picked)
    again, _ = ev.sample_documents(iter(docs), k=6, min_tokens=16, seed=0)
    assert [d.tolist() for d in again] == [d.tolist() for d in picked]
    assert len(ev.sample_documents(iter(docs), k=100, min_tokens=16, seed=0)[0]) == 30


def test_loss_curves(tmp_path, setup):
    records = read_metrics(setup["run"] / "metrics.jsonl")
    assert len(records) == 22  # the torn last line is skipped
    assert curve_keys(records) == {
        "train": ["loss", "loss_ce", "loss_cos", "loss_mlm"],
        "valid_losses": ["mlm_loss"],
        "valid_scores": ["agreement", "hidden_cosine"],
    }
    assert plot_loss_curves(setup["run"] / "metrics.jsonl", tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    (tmp_path / "m.jsonl").write_text('{"split": "train", "step": 1, "lr": 0.1, "loss_scale": 1.0}\n')
    assert not plot_loss_curves(tmp_path / "m.jsonl", tmp_path / "d.png") and not (tmp_path / "d.png").exists()


def _cli(setup, *extra, student=None, data=None):
    return ev.main(
        [
            "--student",
            str(student or setup["dirs"]["student"]),
            "--teacher",
            str(setup["dirs"]["teacher"]),
            "--data",
            str(data or setup["data"]),
            "--output",
            str(setup["root"] / "cli"),
            *extra,
        ]
    )


def test_errors_exit_nonzero_with_message(setup, tmp_path, capsys):
    assert _cli(setup, student=tmp_path / "nope") == 2
    assert f"--student {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err
    assert _cli(setup, data=tmp_path / "nodata") == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _cli(setup, data=tmp_path / "empty") == 2
    assert "no manifest.json" in capsys.readouterr().err
    (tmp_path / "novalid").mkdir()
    (tmp_path / "novalid" / "manifest.json").write_text(json.dumps(_manifest(setup["tok"], 0)))
    assert _cli(setup, data=tmp_path / "novalid") == 2
    assert "no sequences in split 'valid'" in capsys.readouterr().err
    other_tok = tiny.bert_tokenizer(vocab_size=300)
    other = tiny.save_model_dir(tmp_path / "other", tiny.bert_model(other_tok, layers=1), other_tok)
    assert _cli(setup, student=other) == 2
    err = capsys.readouterr().err
    assert f"--student {other}: vocabulary of {len(other_tok)} tokens" in err and "manifest.json" in err
    assert _cli(setup, "--metrics", str(tmp_path / "none.jsonl")) == 2
    assert f"--metrics {tmp_path / 'none.jsonl'}: no such file" in capsys.readouterr().err
    assert not (setup["root"] / "cli" / "report.json").exists()


def test_pooling_mode_from_sentence_transformers_files(tmp_path):
    assert ev.pooling_mode(str(tmp_path)) == ("mean", False)  # plain Hugging Face directory
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert ev.pooling_mode(str(tmp_path)) == ("mean", True)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert ev.pooling_mode(str(tmp_path)) == ("cls", True)
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])
    attn = torch.tensor([[1, 1, 0]])
    assert ev.pool(hidden, attn, "mean").tolist() == [[2.0, 2.0]]
    assert ev.pool(hidden, attn, "cls").tolist() == [[1.0, 0.0]]
    assert ev.pool(hidden, attn, "max").tolist() == [[3.0, 4.0]]


def test_report_includes_the_downstream_table(setup, tmp_path):
    """--downstream: the run's teacher, student_init, truncation baseline and student are scored on a labeled task by
    pretrain.downstream (a linear probe here, fast) and report.md carries the table."""
    import csv

    run = setup["run"]
    (run / "config.json").write_text(
        json.dumps({"teacher": {"name_or_path": str(setup["dirs"]["teacher"])}, "student": {"layers": [0, 2]}})
    )
    words = sorted({w.strip(".,:;'").lower() for line in tiny.TEXT for w in line.split()} - {""})
    rng = np.random.default_rng(0)
    with open(tmp_path / "task.csv", "w", newline="") as f:  # label: does the text hold the word "teacher"?
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(240):
            bag = list(rng.choice(words, 6))
            w.writerow([" ".join(bag + (["teacher"] if i % 2 else [])), "yes" if i % 2 else "no"])
    try:
        report = ev.evaluate(
            str(setup["dirs"]["student"]),
            str(setup["dirs"]["teacher"]),
            setup["data"],
            tmp_path / "out",
            downstream=[f"csv:{tmp_path / 'task.csv'}"],
            downstream_seeds=1,
            downstream_mode="probe",
            **KW,
        )
    finally:
        (run / "config.json").unlink()
    task = next(iter(report["downstream"]["tasks"].values()))
    assert list(task["results"]) == ["teacher", "student_init", "truncation", "student"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Downstream evaluation" in md and "truncation" in md and "| student " in md
    assert json.loads((tmp_path / "out" / "report.json").read_text())["downstream"]["complete"] is True


def test_masking_and_settings_are_parameters(setup, report, tmp_path):
    """The MLM evaluation's masking defaults to BERT's 80/10/10 (ev.MASKING) and can be given (here the demo
    configs' keep-everything masking: the same positions, other inputs, another loss); every other knob
    is an EvalSettings field, given as keyword or as settings; an unknown one is a TypeError."""
    from pretrain.masking import MaskingConfig

    assert "80%/10%/10% mask/random/keep" in report["meta"]["mlm"]["masking"]
    keep = MaskingConfig(word_mask=0.0, word_keep=1.0, word_rand=0.0)
    settings = ev.EvalSettings(**{**KW, "max_documents": 4})
    args = (str(setup["dirs"]["student"]), str(setup["dirs"]["teacher"]), setup["data"], tmp_path / "keep")
    other = ev.evaluate(*args, masking=keep, settings=settings)
    assert "0%/0%/100% mask/random/keep" in other["meta"]["mlm"]["masking"]
    assert other["meta"]["mlm"]["num_masked"] == report["meta"]["mlm"]["num_masked"]  # the same positions
    assert other["teacher"]["mlm_loss"] != pytest.approx(report["teacher"]["mlm_loss"], rel=1e-4)
    assert other["meta"]["retrieval"]["num_documents"] <= 4
    with pytest.raises(TypeError):
        ev.evaluate(*args, no_such_setting=1)


def test_pad_batch_is_the_tasks_collation():
    from pretrain.tasks.examples import Examples, collate

    seqs = [np.array([4, 5, 6]), np.array([7]), np.array([8, 9])]
    ids, attn = ev.pad_batch(seqs, 0, torch.device("cpu"))
    assert ids.tolist() == [[4, 5, 6], [7, 0, 0], [8, 9, 0]] and attn.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    b = collate(Examples(seqs), range(3), 0)
    assert torch.equal(ids, b["input_ids"]) and torch.equal(attn, b["attention_mask"])


def test_pooling_mode_of_a_hub_name_reads_its_modules_json(tmp_path):
    """A teacher given by hub name is pooled as its modules.json says (issue 24 item 6), read through the Hugging
    Face cache: here a CLS-pooling model laid out in a cache folder, offline."""
    import subprocess
    import sys

    snap = tmp_path / "hub" / "models--org--cls-encoder" / "snapshots" / ("a" * 40)
    (snap / "1_Pooling").mkdir(parents=True)
    (tmp_path / "hub" / "models--org--cls-encoder" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--cls-encoder" / "refs" / "main").write_text("a" * 40)
    (snap / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (snap / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = "from pretrain.evaluate import pooling_mode; print(pooling_mode('org/cls-encoder'))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "('cls', False)"


# ------------------------------------------------------------------------------------ validation against a hand count
def _softmax_np(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_validation_kl_is_teacher_to_student_by_hand():
    """The in-run validation (pretrain.validate.Validator, the same mlm_sums as pretrain.evaluate) on a tiny batch: its
    kl_to_teacher equals KL(teacher || student) = sum p_t (log p_t - log p_s) over the vocabulary, mean over the masked
    positions, computed here in float64 numpy from the two models' own MLM logits; the reverse direction differs by
    far more than the tolerance (the teacher head's LayerNorm gain x 40: a peaked teacher, a flat random student).
    Loss, accuracy and agreement are checked the same way. Budget: fp32 logits, fp32 log-softmax in the product,
    float64 sums: rtol 1e-5."""
    from types import SimpleNamespace

    from pretrain.data import collate
    from pretrain.masking import MaskingConfig
    from pretrain.validate import Validator

    tok = tiny.bert_tokenizer()
    teacher, student = tiny.bert_model(tok, layers=2), tiny.bert_model(tok, layers=2, seed=1)
    with torch.no_grad():
        teacher.cls.predictions.transform.LayerNorm.weight.mul_(40.0)
    seqs = [np.array(ids) for ids in tok(tiny.corpus(1)[:5])["input_ids"]]
    batch = collate(seqs, pad_id=tok.pad_token_id)
    masker = Masker.from_tokenizer(MaskingConfig(mlm_mask_prop=0.3), tok, seed=2)
    validator = Validator(
        SimpleNamespace(student=student, teacher=teacher),
        lambda: [batch],
        masker,
        device=torch.device("cpu"),
        all_reduce=lambda t: None,  # one rank
        rank=0,
    )
    with torch_threads():
        rec = validator.run(step=7)
    masked, labels = masker(batch["input_ids"], batch["attention_mask"], step=0, rank=0, micro_step=0)
    with torch.no_grad():
        s = student(input_ids=masked, attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=masked, attention_mask=batch["attention_mask"]).logits
    pos = (labels != -100).numpy()
    s, t, y = s.numpy()[pos].astype(np.float64), t.numpy()[pos].astype(np.float64), labels.numpy()[pos]
    ps, pt = _softmax_np(s), _softmax_np(t)
    kl_ts = float(np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1)))
    kl_st = float(np.mean(np.sum(ps * (np.log(ps) - np.log(pt)), -1)))
    assert rec["masked_tokens"] == int(pos.sum()) > 10 and rec["step"] == 7
    assert abs(kl_st / kl_ts - 1) > 0.2, (kl_ts, kl_st)
    assert rec["kl_to_teacher"] == pytest.approx(kl_ts, rel=1e-5)
    assert rec["mlm_loss"] == pytest.approx(float(np.mean(-np.log(ps[np.arange(len(y)), y]))), rel=1e-5)
    assert rec["mlm_accuracy"] == float(np.mean(s.argmax(-1) == y))
    assert rec["agreement"] == float(np.mean(s.argmax(-1) == t.argmax(-1)))
