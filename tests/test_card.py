"""Model cards (pretrain.card, issue 22 item 4): every exported folder gets a README.md that round-trips through
huggingface_hub's ModelCard.load, names the teacher as base_model and whose model-index numbers equal report.json's;
--push-to-hub is refused offline before any work; a folder that is not a model is refused with a clear message.

One tiny run (2 steps, one rank, in process) whose teacher sits in a hub-cache layout (models--org--tiny-bert/
snapshots/REV, with a card of its own: licence mit), evaluated into the run directory with tiny settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard, ModelCardData

from pretrain import card as mc
from tests import tiny
from tests.helpers import REPO, assets, tiny_overrides, train_in_process

TINY = REPO / "configs" / "tiny-cpu.json"
ROLES = ("teacher", "student_init", "student")
KW: dict[str, Any] = {
    "bench_batch": 2,
    "bench_length": 16,
    "bench_warmup": 1,
    "bench_iters": 2,
    "batch_size": 8,
    "max_sequences": 16,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``{"run", "teacher", "at_export": {folder name: card text at export}, "report"}``."""
    from pretrain.config import load
    from pretrain.evaluate import evaluate

    root = tmp_path_factory.mktemp("card")
    teacher = root / "hub" / "models--org--tiny-bert" / "snapshots" / ("a" * 40)
    shutil.copytree(assets()["bert"], teacher)
    (teacher / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n\n# tiny teacher\n")
    out = root / "run"
    over = tiny_overrides(
        "bert",
        out,
        steps=2,
        **{"teacher.name_or_path": str(teacher), "train.evaluate": False, "train.save_interval": 0},
    )
    train_in_process(load(TINY, over))
    at_export = {f: (out / f / "README.md").read_text() for f in ("student", "student_init")}
    report = evaluate(
        str(out / "student"), str(teacher), assets()["shards-bert"], out, student_init=str(out / "student_init"), **KW
    )
    return {"run": out, "teacher": teacher, "at_export": at_export, "report": report}


def meta(card: ModelCard) -> ModelCardData:
    """The card's front matter, typed (ModelCard.load parses a model card's into ModelCardData)."""
    assert isinstance(card.data, ModelCardData)
    return card.data


def _results(folder: Path) -> list:
    card = ModelCard.load(folder / "README.md")  # the round trip: front matter parsed back, model-index included
    return meta(card).eval_results or []


def test_export_writes_a_card_naming_the_teacher_data_recipe_and_machine(run):
    for name, text in run["at_export"].items():
        card = ModelCard(text)
        assert meta(card).base_model == "org/tiny-bert", name  # from the hub-cache layout of the teacher's path
        assert meta(card).license == "mit" and meta(card).language == "en"  # the teacher's card's front matter
        assert "distillation" in (meta(card).tags or []) and meta(card).pipeline_tag == "fill-mask"
        assert meta(card).library_name == "transformers"
        assert "Not evaluated yet" in text
    text = run["at_export"]["student"]
    assert meta(ModelCard(text)).datasets == ["text:corpus.txt"]  # the shards' manifest source
    assert "alpha_ce = 5.0, alpha_mlm = 2.0, alpha_cos = 1.0; temperature 2.0" in text
    assert "Layer map (student layer i <- teacher layer): [0, 2] of the teacher's 4" in text
    assert "batch 4 sequences per step (micro-batch 2, accumulation 2, ranks 1)" in text
    assert "torch 2." in text and "DeepSpeed" in text  # environment.json


def test_report_rewrites_the_cards_with_the_report_numbers(run):
    report = json.loads((run["run"] / "report.json").read_text())
    for name in ("student", "student_init"):
        results = _results(run["run"] / name)
        assert meta(ModelCard.load(run["run"] / name / "README.md")).base_model == "org/tiny-bert"
        columns = {r: row for r, row in report.items() if isinstance(row, dict) and r not in ("meta", "downstream")}
        assert set(ROLES) <= set(columns)  # more columns (deployment rows) are cards' results too
        want = {
            (role, key): value
            for role, row in columns.items()
            for key, value in row.items()
            if key in mc.REPORT_METRICS and isinstance(value, (int, float))
        }
        got = {(r.metric_config, r.metric_type): r.metric_value for r in results}
        assert got == want and len(results) == len(want)  # every number, unchanged, nothing else
        assert {"recall_at_1", "mlm_accuracy", "speedup"} <= {k for _, k in got}
        speed = {r.metric_config: r.metric_args for r in results if r.metric_type == "tokens_per_s"}
        assert speed == report["meta"]["speed_spread"]  # the spread of the repeats goes with the speed
    text = (run["run"] / "student" / "README.md").read_text()
    assert "**distilled student** column" in text and "Not evaluated yet" not in text


def test_downstream_and_deployment_rows_equal_their_sources(run, tmp_path):
    from pretrain.tasks.summary import summarise

    folder = tmp_path / "student"
    shutil.copytree(run["run"] / "student", folder)

    def runs(score: float) -> list[dict]:
        one = lambda i: {"seed": i, "score": score + i / 100, "inference_examples_per_s": 100.0}  # noqa: E731
        return [{**one(i), "metrics": {"test": {"accuracy": score + i / 100}}} for i in (0, 1)]

    downstream: dict[str, Any] = {
        "mode": "finetune",
        "seeds": 2,
        "teacher": "teacher",
        "student": "student",
        "models": {"teacher": {}, "student": {}},
        "tasks": {
            "embedded:rotten-tomatoes": {"results": {"teacher": {"runs": runs(0.8)}, "student": {"runs": runs(0.7)}}}
        },
    }
    summarise(downstream)
    report = {**run["report"], "downstream": downstream}
    report["meta"] = {**report["meta"], "paths": {**report["meta"]["paths"], "student": str(folder)}}
    checks = [
        {"name": "int8 vs fp32 MLM agreement drop", "value": 0.25, "tolerance": 0.01, "unit": "", "passed": False}
    ]
    (folder / "onnx").mkdir()
    (folder / "onnx" / "checks.json").write_text(json.dumps(checks))
    mc.write_card(folder, report=report)
    results = _results(folder)
    ds = {
        (r.metric_config, r.dataset_split, r.metric_type): r for r in results if r.dataset_type.startswith("embedded:")
    }
    for model in ("teacher", "student"):
        r = downstream["tasks"]["embedded:rotten-tomatoes"]["results"][model]
        got = ds[(model, "test", "accuracy")]
        assert got.metric_value == r["metrics_mean"]["test/accuracy"]
        assert got.metric_args == {"std": r["metrics_std"]["test/accuracy"], "seeds": [0, 1]}
    (check,) = [r for r in results if r.metric_config == "onnx-int8"]
    assert check.metric_value == 0.25 and check.metric_args == {"tolerance": 0.01, "passed": False}
    card = ModelCard.load(folder / "README.md")
    assert "int8" in (meta(card).tags or []) and "Deployment check FAILED" in card.text


def test_a_pruned_students_card_says_what_was_pruned(run, tmp_path):
    folder = tmp_path / "pruned"
    shutil.copytree(run["run"] / "student", folder)
    info = json.loads((folder / "distill_export.json").read_text())
    prune = {
        "method": "minitron",
        "calibration": {"sequences": 8, "source": "train split"},
        "hidden_size": [32, 16],
        "num_attention_heads": [4, 2],
        "intermediate_size": [128, 64],
        "hidden_channels": list(range(16)),
    }
    info["student"] = {"layer_map": [0, 2], "teacher_layers": 4, "init": "prune", "prune": prune}
    (folder / "distill_export.json").write_text(json.dumps(info))
    mc.write_card(folder)
    card = ModelCard.load(folder / "README.md")
    assert "pruned" in (meta(card).tags or []) and meta(card).base_model == "org/tiny-bert"
    assert (
        "Pruned (minitron): hidden_size 32 -> 16, num_attention_heads 4 -> 2, intermediate_size 128 -> 64" in card.text
    )
    assert "hidden_channels" not in card.text  # the kept indices stay in distill_export.json


def test_deploy_refreshes_the_card_of_an_export(run, tmp_path):
    from pretrain.deploy.cli import deploy

    folder = tmp_path / "student"
    shutil.copytree(run["run"] / "student", folder)
    result = deploy(folder, exporter="torchscript")
    assert result.passed
    results = _results(folder)
    assert [r.metric_value for r in results if r.metric_config == "onnx-fp32"] == [result.checks[0].value]
    assert "onnx" in (meta(ModelCard.load(folder / "README.md")).tags or [])


def test_finetuned_folder_card(tmp_path, bert_tok):
    from pretrain.tasks.finetune import save_model

    metrics = {"dev": {"accuracy": 0.75, "f1": 0.5}, "test": {"accuracy": 0.625}}
    info = {"task": "embedded:rotten-tomatoes", "seed": 3, "model": "teacher", "source": "embedded:minilm-l6"}
    save_model(tiny.bert_model(bert_tok, layers=1, mlm=False), bert_tok, tmp_path / "ft", {**info, "metrics": metrics})
    card = ModelCard.load(tmp_path / "ft" / "README.md")
    assert meta(card).base_model == "sentence-transformers/all-MiniLM-L6-v2" and meta(card).license == "apache-2.0"
    results = meta(card).eval_results or []
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in results}
    assert got == {(s, k): v for s, m in metrics.items() for k, v in m.items()}
    assert [(r.metric_args or {}).get("seeds") for r in results] == [[3]] * len(got)


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("embedded:minilm-l6", "sentence-transformers/all-MiniLM-L6-v2"),
        ("embedded:bert-tiny-mlm", None),
        ("bert-base-uncased", "bert-base-uncased"),
        ("/cache/hub/models--FacebookAI--roberta-base/snapshots/abc", "FacebookAI/roberta-base"),
        ("/some/local/teacher", None),
    ],
)
def test_hub_id(name, want):
    assert mc.hub_id(name) == want


def test_push_to_hub_offline_is_refused_before_any_work(run, tmp_path, monkeypatch, capsys):
    from pretrain import export

    ckpt = run["run"] / "checkpoints"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert export.main([str(ckpt), "--output", str(tmp_path / "a"), "--push-to-hub", "me/student"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err and not (tmp_path / "a").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port: no network
    assert export.main([str(ckpt), "--output", str(tmp_path / "b"), "--push-to-hub", "me/student"]) == 2
    assert "http://127.0.0.1:9 is not reachable" in capsys.readouterr().err and not (tmp_path / "b").exists()
    assert mc.main([str(run["run"] / "student"), "--push-to-hub", "not a repo!"]) == 2
    assert "not a hub repo id" in capsys.readouterr().err


def test_the_card_is_core_level():
    """pretrain.card, card_index and card_sources import nothing from pretrain.tasks or pretrain.deploy (tasks and
    deploy call them), not even inside functions."""
    from tests.test_student import pretrain_imports

    graph = pretrain_imports()
    assert graph["card"] == {"card_index", "card_sources", "report"} and graph["card_index"] == {"card_sources"}
    assert graph["card_sources"] <= {"report"}
    assert "deploy" not in graph["report"] and "card" not in graph["report"]


def test_push_to_hub_uploads_the_exported_folder_with_its_card(run, tmp_path, monkeypatch, capsys):
    """With the hub reachable (here: the checks and the HfApi calls stubbed), the export is uploaded whole."""
    import huggingface_hub

    from pretrain import export

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(export, "check_push", lambda repo: calls.append(("check", {"repo": repo})))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **kw: calls.append(("create", kw)))

    def upload(self, **kw):
        calls.append(("upload", kw))
        assert (Path(kw["folder_path"]) / "README.md").is_file()  # the card is there before the upload
        return "https://hub.example/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload)
    out = tmp_path / "out"
    assert export.main([str(run["run"] / "checkpoints"), "--output", str(out), "--push-to-hub", "me/student"]) == 0
    assert [c[0] for c in calls] == ["check", "create", "upload"]
    assert calls[2][1]["folder_path"] == str(out) and calls[2][1]["repo_id"] == "me/student"
    assert "pushed" in capsys.readouterr().out
    from huggingface_hub.errors import LocalTokenNotFoundError

    def no_token(self, repo, **kw):
        raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_token)
    monkeypatch.setattr(mc, "check_push", lambda repo: None)
    assert mc.main([str(out), "--push-to-hub", "me/student"]) == 2  # not logged in: one line, no traceback
    err = capsys.readouterr().err
    assert "the upload of" in err and "LocalTokenNotFoundError" in err and "Traceback" not in err


def test_a_folder_that_is_not_a_model_is_refused(tmp_path, capsys):
    assert mc.main([str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert mc.main([str(tmp_path)]) == 2
    assert f"{tmp_path}: not a model folder (no readable config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(mc.CardError, match="not a model folder \\(no weights"):
        mc.write_card(tmp_path)
    assert not (tmp_path / "README.md").exists()


def test_card_command_help(capsys):
    with pytest.raises(SystemExit) as e:
        mc.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--push-to-hub REPO" in out and "--report FILE" in out
