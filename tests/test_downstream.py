"""pretrain.tasks and pretrain.downstream: metrics, splits, the embedded tasks, fine-tuning, probing, the truncation
baseline, the report, bad input, and the exported student with token-classification / QA heads."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain import downstream as ds
from pretrain.tasks import (
    LocalFields,
    SplitConfig,
    compute_metrics,
    deduplicate,
    load_task,
    make_splits,
    normalise,
    score,
)
from tests import tiny
from tests.helpers import assert_effect

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------- helpers
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer BERT (MLM head) with a tokenizer trained in-process, saved as a model folder."""
    tok = tiny.bert_tokenizer()
    return tiny.save_model_dir(tmp_path_factory.mktemp("tiny") / "bert", tiny.bert_model(tok, layers=2), tok)


@pytest.fixture(scope="module")
def bert_tiny():
    """The embedded pretrained 2-layer hidden-128 BERT (real weights, fast on CPU)."""
    from data_prep.embedded import resolve_model

    return resolve_model("embedded:bert-tiny-mlm")


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


WORDS = [
    "good",
    "great",
    "fine",
    "nice",
    "bad",
    "awful",
    "poor",
    "sad",
    "movie",
    "film",
    "plot",
    "actor",
    "scene",
    "music",
    "story",
    "the",
    "a",
    "of",
    "and",
    "was",
    "is",
    "very",
    "quite",
    "really",
    "not",
]


def _synthetic_rows(n: int, seed: int = 0) -> list[list]:
    rng = np.random.default_rng(seed)
    return [
        [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + f" {i}", int(rng.integers(0, 2))] for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------------------- metrics
def test_metrics_match_sklearn_and_scipy():
    from scipy import stats
    from sklearn import metrics as skm

    y = np.array([0, 1, 1, 0, 1, 1, 0, 0, 1, 1])
    p = np.array([0, 1, 0, 0, 1, 1, 1, 0, 1, 0])
    got = compute_metrics(("accuracy", "f1", "matthews_correlation"), p, y)
    assert got == pytest.approx(
        {"accuracy": 0.7, "f1": skm.f1_score(y, p), "matthews_correlation": skm.matthews_corrcoef(y, p)}
    )
    assert got["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))  # tp 4, fp 1, fn 2
    yr = np.array([0.1, 2.5, 3.0, 4.9, 1.2, 0.0])
    pr = np.array([0.3, 2.0, 3.5, 4.0, 1.0, 0.5])
    got = compute_metrics(("pearson", "spearmanr"), pr, yr)
    assert got == pytest.approx({"pearson": stats.pearsonr(pr, yr)[0], "spearmanr": stats.spearmanr(pr, yr)[0]})
    assert compute_metrics(("pearson",), np.ones(6), yr) == {"pearson": 0.0}  # constant predictions
    # GLUE task score: mean of the metrics (and of MNLI's matched / mismatched)
    assert score({"dev": {"f1": 0.8, "accuracy": 0.6}}) == pytest.approx(0.7)
    assert score({"dev_matched": {"accuracy": 0.8}, "dev_mismatched": {"accuracy": 0.7}}) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        compute_metrics(("bleu",), p, y)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of their ranks (Spearman's definition)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        ranks[tie] = ranks[tie].mean()
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_on_random_predictions_match_hand_formulas_and_sklearn_scipy(seed):
    """GLUE's metrics on 300 random, partly right predictions: accuracy, F1 of class 1 (2TP / (2TP + FP + FN)), MCC
    ((TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); sklearn's multi-class form for 3 classes), Pearson
    (covariance over the standard deviations) and Spearman (Pearson of the tie-averaged ranks; the scores rounded
    so that ties occur), each by hand here and by sklearn / scipy (float64: rel 1e-9)."""
    from scipy import stats
    from sklearn import metrics as skm

    rng = np.random.default_rng(seed)
    n = 300
    y = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.7, y, rng.integers(0, 2, n))  # ~85% right, not symmetric in the two classes
    p[:40] = 1  # more false positives than false negatives: F1 of class 0 differs from F1 of class 1
    tp, tn = int(((p == 1) & (y == 1)).sum()), int(((p == 0) & (y == 0)).sum())
    fp, fn = int(((p == 1) & (y == 0)).sum()), int(((p == 0) & (y == 1)).sum())
    got = compute_metrics(("accuracy", "f1", "matthews_correlation"), p, y)
    hand = {
        "accuracy": (tp + tn) / n,
        "f1": 2 * tp / (2 * tp + fp + fn),
        "matthews_correlation": (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)),
    }
    assert got == pytest.approx(hand, rel=1e-9)
    assert got == pytest.approx(
        {
            "accuracy": skm.accuracy_score(y, p),
            "f1": skm.f1_score(y, p),
            "matthews_correlation": skm.matthews_corrcoef(y, p),
        },
        rel=1e-9,
    )
    assert abs(got["f1"] - 2 * tn / (2 * tn + fp + fn)) > 0.01  # the positive class matters
    y3 = rng.integers(0, 3, n)
    p3 = np.where(rng.random(n) < 0.6, y3, rng.integers(0, 3, n))
    got3 = compute_metrics(("accuracy", "matthews_correlation"), p3, y3)
    assert got3["accuracy"] == pytest.approx(float(np.mean(p3 == y3)), rel=1e-12)
    assert got3["matthews_correlation"] == pytest.approx(skm.matthews_corrcoef(y3, p3), rel=1e-9)
    yr = np.round(rng.normal(size=n), 1)
    pr = np.round(yr + rng.normal(scale=0.8, size=n) + 0.3 * yr**2, 1)  # monotone-ish, not linear; ties
    got = compute_metrics(("pearson", "spearmanr"), pr, yr)
    assert got == pytest.approx({"pearson": _pearson(pr, yr), "spearmanr": _pearson(_ranks(pr), _ranks(yr))}, rel=1e-9)
    want = {"pearson": stats.pearsonr(pr, yr)[0], "spearmanr": stats.spearmanr(pr, yr)[0]}
    assert got == pytest.approx(want, rel=1e-9)
    assert abs(got["pearson"] - got["spearmanr"]) > 1e-3 and len(np.unique(pr)) < n  # distinct, with ties


# ----------------------------------------------------------------------------------------------------------- splits
def test_splits_deterministic_stratified_disjoint(tmp_path):
    labels = np.array([0] * 700 + [1] * 200 + [2] * 100)
    a = make_splits(labels, dev=0.1, test=0.2, seed=3)
    b = make_splits(labels, dev=0.1, test=0.2, seed=3)
    c = make_splits(labels, dev=0.1, test=0.2, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["test"], c["test"])
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(1000))  # a partition
    for k, frac in (("test", 0.2), ("dev", 0.1)):
        assert np.bincount(labels[a[k]]).tolist() == [int(700 * frac), int(200 * frac), int(100 * frac)]

    # a local file: duplicates (after normalisation) never cross splits; conflicting labels are dropped
    rows = _synthetic_rows(400)
    rows += [[r[0].upper() + "  ", r[1]] for r in rows[:50]]  # 50 duplicates differing in case / spaces
    rows += [["ambiguous text", 0], ["Ambiguous  text", 1]]
    path = _write_csv(tmp_path / "data.csv", ["text", "label"], rows)
    t1, t2 = load_task(f"csv:{path}"), load_task(f"csv:{path}")
    keys = {k: {normalise(x) for x in sp.texts} for k, sp in t1.splits.items()}
    assert not (keys["train"] & keys["dev"]) and not (keys["train"] & keys["test"]) and not (keys["dev"] & keys["test"])
    assert sum(len(v) for v in keys.values()) == 400 and "ambiguous text" not in set().union(*keys.values())
    assert t1.manifest["duplicates_dropped"] == 51 and t1.manifest["conflicting_labels_dropped"] == 1
    assert t1.manifest["sha256"] == t2.manifest["sha256"]
    assert t1.manifest["splits"]["test"]["used"]["count"] == 40
    kept, dups, conflicts = deduplicate(["a b", "A  b", "c"], np.array([1, 1, 0]))
    assert kept.tolist() == [0, 2] and (dups, conflicts) == (1, 0)
    # caps are stratified and deterministic
    capped = load_task(f"csv:{path}", split=SplitConfig(max_train=100, max_eval=20))
    assert len(capped.splits["train"]) == 100 and len(capped.splits["test"]) == 20
    tr = t1.splits["train"].labels
    assert abs(capped.splits["train"].labels.mean() - tr.mean()) < 0.02


def test_embedded_tasks_load_with_documented_counts():
    expect = {  # deduplicated total, labels
        "embedded:rotten-tomatoes": (12751, ["rotten", "fresh"]),
        "embedded:wiki-topic": (
            9033,
            [
                "Arts",
                "Biology and health sciences",
                "Everyday life",
                "Geography",
                "History",
                "Mathematics",
                "People",
                "Philosophy and religion",
                "Physical sciences",
                "Society and social sciences",
                "Technology",
            ],
        ),
        "embedded:trec": (5380, ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]),
        "embedded:movie-sentiment-score": (10603, []),
    }
    for name, (total, label_names) in expect.items():
        task = load_task(name)
        counts = {k: len(v) for k, v in task.splits.items()}
        assert sum(counts.values()) == total, (name, counts)
        assert task.label_names == label_names and task.report_splits == ("test",)
        keys = [{normalise(x) for x in task.splits[k].texts} for k in ("train", "dev", "test")]
        assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2]), name
        if label_names:
            full = np.bincount(np.concatenate([s.labels for s in task.splits.values()]), minlength=len(label_names))
            test = np.bincount(task.splits["test"].labels, minlength=len(label_names))
            if name != "embedded:wiki-topic":  # wiki-topic's test split is the demo's held-out documents
                assert np.abs(test / test.sum() - full / full.sum()).max() < 0.01, name
    rt = load_task("embedded:rotten-tomatoes")
    assert (len(rt.splits["train"]), len(rt.splits["dev"]), len(rt.splits["test"])) == (10201, 1275, 1275)
    assert rt.manifest["splits"]["train"]["full"]["labels"] == {"rotten": 4307, "fresh": 5894}
    trec = load_task("embedded:trec")
    assert trec.splits["train"].texts[0].endswith("?")
    wiki = load_task("embedded:wiki-topic")
    assert len(wiki.splits["test"]) == 914  # the entries data_prep prepare (seed 0, 10%) holds out
    msc = load_task("embedded:movie-sentiment-score")
    assert msc.kind == "regression" and msc.metrics == ("pearson", "spearmanr")
    assert -4 <= msc.splits["train"].labels.min() < -3 and 3 < msc.splits["train"].labels.max() <= 4


# ------------------------------------------------------------------------------------------------ finetune / probe
@pytest.mark.slow
def test_finetune_lowers_the_loss_and_beats_chance_on_real_data(bert_tiny, tmp_path):
    task = load_task("embedded:trec", split=SplitConfig(max_train=800, max_eval=300))
    spec = ds.check_model(ds.ModelSpec("bert-tiny", bert_tiny))
    cfg = ds.FinetuneConfig(
        epochs=2, lr=1e-3, batch_size=32, max_length=32, warmup_ratio=0.06, max_train=800, max_eval=300
    )
    r = ds.finetune(spec, task, cfg, seed=0, device=torch.device("cpu"), save_dir=tmp_path / "saved")
    majority = np.bincount(task.splits["test"].labels).max() / len(task.splits["test"])
    assert_effect("loss drop (1 - last / first)", 1 - r["loss_last"] / r["loss_first"], 0.2, r)
    assert_effect("test accuracy - majority", r["metrics"]["test"]["accuracy"] - majority, 0.15, r)
    assert r["epoch"] in (1, 2) and r["steps"] == 2 * 25 and r["train_examples_per_s"] > 0
    # the saved model is the selected one and reloads as a sequence classifier with the label names
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert saved.config.id2label[3] == "HUM" and saved.num_labels == 6


def test_probe_beats_chance(bert_tiny):
    task = load_task("embedded:trec", split=SplitConfig(max_train=1000, max_eval=300))
    spec = ds.check_model(ds.ModelSpec("bert-tiny", bert_tiny))
    r = ds.probe(spec, task, ds.FinetuneConfig(max_length=32), device=torch.device("cpu"))
    majority = np.bincount(task.splits["test"].labels).max() / len(task.splits["test"])
    assert_effect("test accuracy - majority", r["metrics"]["test"]["accuracy"] - majority, 0.2, r)
    assert r["c"] in ds.PROBE_C and r["embed_examples_per_s"] > 0


def test_regression_and_pair_paths(tiny_dir, tmp_path, monkeypatch):
    """A regression pair task from CSV through fine-tuning: the reported Pearson / Spearman are scipy's on the
    predictions the run made for the test split's gold scores (seen through compute_metrics), not merely finite."""
    from scipy import stats

    import pretrain.tasks.finetune as ft

    calls = []

    def spy(metrics, predictions, labels):
        out = compute_metrics(metrics, predictions, labels)
        calls.append((np.array(predictions), np.array(labels), out))
        return out

    monkeypatch.setattr(ft, "compute_metrics", spy)
    rng = np.random.default_rng(0)
    rows, scores = [], []
    for i in range(120):
        n = int(rng.integers(2, 14))
        rows.append([" ".join(rng.choice(WORDS, size=n)) + f" {i}", " ".join(rng.choice(WORDS, size=3)), n / 3.0])
        scores.append(n)
    folder = tmp_path / "pairs"
    folder.mkdir()
    _write_csv(folder / "train.csv", ["sentence1", "sentence2", "score"], rows[:80])
    _write_csv(folder / "dev.csv", ["sentence1", "sentence2", "score"], rows[80:100])
    _write_csv(folder / "test.csv", ["sentence1", "sentence2", "score"], rows[100:])
    fields = LocalFields(text="sentence1", pair="sentence2", label="score")
    task = load_task(f"csv:{folder}", fields=fields)
    assert task.kind == "regression" and task.is_pair and task.num_labels == 1 and task.report_splits == ("test",)
    out = tmp_path / "out"
    res = ds.run_downstream(
        [f"csv:{folder}"],
        {"a": str(tiny_dir)},
        out,
        seeds=1,
        fields=fields,
        overrides={"epochs": 2, "lr": 1e-3, "batch_size": 16},
        plot=False,
        progress=lambda s: None,
    )
    m = res["tasks"][f"csv:{folder}"]["results"]["a"]["runs"][0]["metrics"]["test"]
    assert set(m) == {"pearson", "spearmanr"}
    preds, gold, reported = calls[-1]  # the test split, evaluated after training (the dev split before, per epoch)
    assert reported == m and sorted(gold.tolist()) == pytest.approx(sorted(n_words / 3.0 for n_words in scores[100:]))
    assert preds.dtype.kind == "f" and np.ptp(preds) > 0  # real scores: the correlations are defined
    want = {"pearson": stats.pearsonr(preds, gold)[0], "spearmanr": stats.spearmanr(preds, gold)[0]}
    assert m == pytest.approx(want, rel=1e-9, abs=1e-12)
    # the mean-pooled head (for sentence encoders) on the same task; --save-model keeps encoder + head
    res = ds.run_downstream(
        [f"csv:{folder}"],
        {"a": str(tiny_dir)},
        out,
        seeds=1,
        fields=fields,
        plot=False,
        overrides={"epochs": 1, "lr": 1e-3, "batch_size": 16, "head": "mean"},
        save_model=tmp_path / "saved",
        progress=lambda s: None,
    )
    run = res["tasks"][f"csv:{folder}"]["results"]["a"]["runs"][0]
    assert np.isfinite(run["score"])
    assert_effect("mean-head loss drop (1 - last / first)", 1 - run["loss_last"] / run["loss_first"], 0.0, run)
    saved = tmp_path / "saved" / "a" / ds.slug(f"csv:{folder}")
    assert (saved / "downstream_head.safetensors").is_file() and (saved / "config.json").is_file()
    # the pair reaches the model: token type 1 appears in the encoded pair
    from transformers import AutoTokenizer

    enc = ds.encode(AutoTokenizer.from_pretrained(tiny_dir), task.splits["test"], 64)
    assert enc.types is not None and all(1 in t for t in enc.types)
    # probe: Ridge on the regression task, classification pair task from jsonl
    res = ds.run_downstream(
        [f"csv:{folder}"], {"a": str(tiny_dir)}, out, mode="probe", fields=fields, plot=False, progress=lambda s: None
    )
    assert res["tasks"][f"csv:{folder}"]["results"]["a"]["runs"][0]["alpha"] in ds.PROBE_ALPHA
    jl = tmp_path / "pairs.jsonl"
    jl.write_text(
        "".join(
            json.dumps({"premise": r[0], "hypothesis": r[1], "label": ["no", "yes"][i % 2]}) + "\n"
            for i, r in enumerate(rows)
        )
    )
    task = load_task(f"jsonl:{jl}", fields=LocalFields(text="premise", pair="hypothesis"))
    assert task.kind == "classification" and task.label_names == ["no", "yes"] and task.is_pair


# ------------------------------------------------------------------------------------------- run dir / truncation
def _fake_run(tmp_path: Path) -> Path:
    """A run directory like the trainer's: config.json, student_init/ and student/ (3 of the teacher's 4 layers)."""
    from pretrain.student import StudentConfig, build_student

    tok = tiny.bert_tokenizer()
    teacher_dir = tiny.save_model_dir(tmp_path / "teacher", tiny.bert_model(tok, layers=4, seed=1), tok)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"teacher": {"name_or_path": str(teacher_dir)}}))
    from transformers import AutoModel

    student, _ = build_student(AutoModel.from_pretrained(teacher_dir), StudentConfig(layers=[0, 2]))
    for name in ("student_init", "student"):
        tiny.save_model_dir(run / name, student, tok)
    return run


def test_truncation_baseline_has_the_teachers_first_k_layers(tmp_path):
    from transformers import AutoModel

    run = _fake_run(tmp_path)
    specs = ds.run_models(run, tmp_path / "out")
    assert [s.name for s in specs] == ["teacher", "student_init", "truncation", "student"]
    trunc = AutoModel.from_pretrained(specs[2].path)
    teacher = AutoModel.from_pretrained(specs[0].path)
    assert trunc.config.num_hidden_layers == 2  # k = the student's depth
    t_state = teacher.state_dict()
    for key, value in trunc.state_dict().items():
        if key.startswith("pooler."):  # the tiny MLM teacher has no pooler: AutoModel initialises one at random
            continue
        assert torch.equal(value, t_state[key]), key  # same names: layer i is teacher layer i, i < k
    assert any(k.startswith("encoder.layer.1.") for k in trunc.state_dict())
    assert not any(k.startswith("encoder.layer.2.") for k in trunc.state_dict())
    # reused on a second call (same teacher and k)
    mtime = (Path(specs[2].path) / "model.safetensors").stat().st_mtime_ns
    ds.run_models(run, tmp_path / "out")
    assert (Path(specs[2].path) / "model.safetensors").stat().st_mtime_ns == mtime


def test_cli_run_writes_json_markdown_and_plot(tmp_path):
    run = _fake_run(tmp_path)
    rows = _synthetic_rows(160)
    data = _write_csv(tmp_path / "d.csv", ["text", "label"], rows)
    out = tmp_path / "ds"
    rc = ds.main(
        [
            "--run",
            str(run),
            "--output",
            str(out),
            "--task",
            f"csv:{data}",
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "16",
        ]
    )
    assert rc == 0
    res = json.loads((out / "downstream.json").read_text())
    assert (
        res["complete"]
        and res["seeds"] == 2
        and list(res["models"]) == ["teacher", "student_init", "truncation", "student"]
    )
    t = res["tasks"][f"csv:{data}"]
    assert t["results"]["teacher"]["share_of_teacher"] == pytest.approx(1.0)
    assert len(t["results"]["student"]["runs"]) == 2 and "score_std" in t["results"]["student"]
    assert set(res["gains"]) == {"student_init", "truncation"}
    assert res["models"]["truncation"]["params"] < res["models"]["teacher"]["params"]
    md = (out / "downstream.md").read_text()
    assert "| model | params | inference ex/s | test/accuracy | share of teacher |" in md
    assert "| `student` |" in md and "±" in md and "Gain of `student`" in md
    assert (out / "downstream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.strip() == ds.render_downstream_markdown(res, "downstream.png").strip()


# -------------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors_and_no_result(tiny_dir, tmp_path, capsys):
    good = _write_csv(tmp_path / "good.csv", ["text", "label"], _synthetic_rows(60))
    empty = _write_csv(tmp_path / "empty.csv", ["text", "label"], [])
    one = _write_csv(tmp_path / "one.csv", ["text", "label"], [[f"text {i}", "pos"] for i in range(30)])
    pair = _write_csv(
        tmp_path / "pair.csv", ["sentence1", "sentence2", "label"], [[f"a {i}", f"b {i}", i % 2] for i in range(30)]
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    out = tmp_path / "out"
    model = ["--model", f"m={tiny_dir}"]
    cases = [
        (["--task", "glue:nope", *model], "unknown task 'glue:nope'; known tasks: glue:cola"),
        (["--task", "embedded:imdb", *model], "embedded:rotten-tomatoes"),
        (["--task", f"csv:{good}", "--model", f"m={broken}"], "does not load"),
        (["--task", f"csv:{good}", "--model", f"m={tmp_path / 'missing'}"], "does not load"),
        (["--task", f"csv:{good}", "--label-field", "stars", *model], "no field --label-field 'stars'"),
        (["--task", f"csv:{one}", *model], "one class only ('pos')"),
        (["--task", f"csv:{pair}", "--text-field", "sentence1", *model], "add --pair-field sentence2"),
        (["--task", f"csv:{good}", "--seeds", "0", *model], "--seeds 0"),
        (["--task", f"csv:{empty}", *model], "no rows"),
        (["--task", f"csv:{good}"], "no model given"),
    ]
    for argv, message in cases:
        assert ds.main([*argv, "--output", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
        assert not (out / "downstream.json").exists()


def test_glue_without_hub_access_names_the_offline_tasks(tiny_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.downstream",
            "--task",
            "glue:rte",
            "--model",
            f"m={tiny_dir}",
            "--output",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "glue:rte" in proc.stderr and "embedded:rotten-tomatoes" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "downstream.json").exists()


# ------------------------------------------------------------------------------------- exported student + heads
@pytest.mark.parametrize("architecture", ["same", "distilbert"])
def test_exported_student_loads_with_token_classification_and_qa_heads(tmp_path, architecture):
    from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification

    from pretrain.export import save_student, write_hf_meta
    from pretrain.student import StudentConfig, build_student

    tok = tiny.bert_tokenizer()
    student, _ = build_student(tiny.bert_model(tok, layers=4), StudentConfig(architecture=architecture))
    meta = tmp_path / "meta"
    write_hf_meta(meta, student.config, tok, {}, type(student).__name__)
    out = save_student(student, tmp_path / "student", meta, {"test": True})
    batch = tok(["Paris is the capital of France.", "The quick brown fox."], padding=True, return_tensors="pt")
    batch.pop("token_type_ids", None) if architecture == "distilbert" else None
    n, width = batch["input_ids"].shape
    torch.manual_seed(0)
    tc = AutoModelForTokenClassification.from_pretrained(out, num_labels=5)
    loss = tc(**batch, labels=torch.randint(0, 5, (n, width))).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in tc.classifier.parameters())
    qa = AutoModelForQuestionAnswering.from_pretrained(out)
    res = qa(**batch, start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 4]))
    assert res.start_logits.shape == (n, width)
    res.loss.backward()
    assert torch.isfinite(res.loss) and all(p.grad is not None for p in qa.qa_outputs.parameters())
    # the encoder weights are the exported student's
    emb = student.get_input_embeddings().weight
    assert isinstance(emb, torch.Tensor) and torch.equal(tc.get_input_embeddings().weight, emb)


# ------------------------------------------------------------------------------- one collation, one prediction loop
def test_collate_pads_to_a_multiple_with_segment_ids_labels_and_teacher_logits():
    from pretrain.tasks.examples import Examples, collate

    data = Examples(
        [np.array([5, 6, 7]), np.array([8]), np.array([9, 10, 11, 12, 13])],
        [np.array([0, 0, 1]), np.array([0]), np.array([0, 0, 0, 1, 1])],
        np.array([2, 0, 1]),
        teacher_logits=np.arange(6, dtype=np.float32).reshape(3, 2),
    )
    b = collate(data, [2, 0], pad_id=1, multiple=8, regression=False)
    assert b["input_ids"].tolist() == [[9, 10, 11, 12, 13, 1, 1, 1], [5, 6, 7, 1, 1, 1, 1, 1]]
    assert b["attention_mask"].sum(1).tolist() == [5, 3] and b["input_ids"].dtype == torch.int64
    assert b["token_type_ids"].tolist()[0] == [0, 0, 0, 1, 1, 0, 0, 0]
    assert b["labels"].tolist() == [1, 2] and b["labels"].dtype == torch.int64
    assert b["teacher_logits"].tolist() == [[4.0, 5.0], [0.0, 1.0]]
    b = collate(data, np.array([1, 0]), pad_id=0, segment_ids=False, regression=True)  # dynamic padding (multiple 1)
    assert b["input_ids"].shape == (2, 3) and "token_type_ids" not in b and b["labels"].dtype == torch.float32
    assert "labels" not in collate(data, [0], pad_id=0)  # no labels unless the task kind is given


def test_one_segment_id_rule(tiny_dir):
    """BERT-style models take segment ids, RoBERTa (one token type) does not; a model whose forward has no
    token_type_ids does not either, whatever its config."""
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    from pretrain.tasks.examples import uses_segment_ids
    from pretrain.tasks.finetune import MeanPoolClassifier

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=2)
    assert uses_segment_ids(bert) and uses_segment_ids(bert.config)
    assert not uses_segment_ids(RobertaConfig(type_vocab_size=1))

    class NoSegments(torch.nn.Module):
        config = bert.config

        def forward(self, input_ids, attention_mask):
            return input_ids

    assert not uses_segment_ids(NoSegments())
    assert uses_segment_ids(MeanPoolClassifier(bert.base_model, 2, regression=False))


def test_prediction_loop_keeps_example_order_whatever_the_batches(tiny_dir):
    """run_batches writes each example's output to its own row: length-sorted and rank-strided batch orders give
    the same logits (up to float rounding of other padding widths), and the predictions follow from them."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pretrain.tasks import Split
    from pretrain.tasks.examples import encode, sorted_batches
    from pretrain.tasks.predict import mean_pooled, predictions, run_batches

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    split = Split([" ".join(WORDS[: 1 + i % 9]) for i in range(11)], np.arange(11) % 2)
    data = encode(tok, split, 32)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=3).eval()
    a = run_batches(model, data, sorted_batches(data.lengths, 4), pad_id=tok.pad_token_id, device="cpu")
    strided = [np.arange(r, 11, 2) for r in (0, 1)]
    b = run_batches(model, data, strided, pad_id=tok.pad_token_id, device="cpu", multiple=8)
    assert a.shape == (11, 3) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    one = run_batches(model, data, [np.array([7])], pad_id=tok.pad_token_id, device="cpu")
    np.testing.assert_allclose(one[7], a[7], atol=1e-5)
    assert not one[np.arange(11) != 7].any()  # rows of examples in no batch stay 0
    assert predictions(a, regression=False).tolist() == a.argmax(-1).tolist()
    assert predictions(a, regression=True).dtype == np.float32
    pooled = run_batches(
        model.base_model, data, [np.arange(11)], pad_id=tok.pad_token_id, device="cpu", head=mean_pooled
    )
    assert pooled.shape == (11, model.config.hidden_size)


def test_entry_points_reexport_the_package():
    """python -m pretrain.downstream / pretrain.taskmode stay thin entry points over pretrain.tasks."""
    import pretrain.downstream as entry
    import pretrain.taskmode as tm
    from pretrain.tasks import downstream, downstream_cli, finetune, recipe, scoring

    assert entry.run_downstream is downstream.run_downstream and entry.main is downstream_cli.main
    assert entry.finetune is finetune.finetune and tm.TaskRecipe is recipe.TaskRecipe
    assert tm.evaluate_classifier is scoring.evaluate_classifier
    for module in ("pretrain.downstream", "pretrain.taskmode"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and f"python -m {module}" in proc.stdout, proc.stderr
