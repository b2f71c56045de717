"""pretrain.deploy: ONNX export, int8, accuracy verdicts, speed records and the CLI, on tiny models made here.

Each model is exported once per module (module-scoped fixtures): the encoder with the default dynamo exporter, the
MLM and the classifier with the faster TorchScript exporter, so both exporters are covered.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pretrain.deploy import cli, common, quantize, report_rows, speed, verify
from pretrain.deploy.onnx_export import export_model, export_onnx
from tests import tiny

TEXTS = verify.DEFAULT_TEXTS


def _initializer_bytes(path) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in onnx.load(str(path)).graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        out[name] = out.get(name, 0) + len(t.raw_data)
    return out


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, bert_tok):
    folder = tiny.save_model_dir(
        tmp_path_factory.mktemp("enc") / "model", tiny.bert_model(bert_tok, layers=2, mlm=False), bert_tok
    )
    export_onnx(folder, folder / "onnx")  # default exporter: dynamo
    quantize.quantize_int8(folder / "onnx/model.onnx", folder / "onnx/model_qint8.onnx")
    return folder


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory, bert_tok):
    folder = tiny.save_model_dir(
        tmp_path_factory.mktemp("mlm") / "model", tiny.bert_model(bert_tok, layers=2), bert_tok
    )
    export_onnx(folder, folder / "onnx", exporter="torchscript")
    quantize.quantize_int8(folder / "onnx/model.onnx", folder / "onnx/model_qint8.onnx")
    return folder


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, roberta_tok):
    """A RoBERTa classifier (3 labels) wide enough (hidden 128) that its linear weights dominate the file."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(
        vocab_size=len(roberta_tok),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=130,
        pad_token_id=roberta_tok.pad_token_id,
        type_vocab_size=1,
    )
    cfg.num_labels = 3  # a PretrainedConfig property (the config class's typed __init__ does not list it)
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(cfg).eval()
    folder = tiny.save_model_dir(tmp_path_factory.mktemp("cls") / "model", model, roberta_tok)
    export_onnx(folder, folder / "onnx", exporter="torchscript")
    quantize.quantize_int8(folder / "onnx/model.onnx", folder / "onnx/model_qint8.onnx")
    return folder


def test_detect_kind(encoder_dir, mlm_dir, classifier_dir):
    assert common.detect_kind(encoder_dir) == "encoder"
    assert common.detect_kind(mlm_dir) == "mlm"
    assert common.detect_kind(classifier_dir) == "classifier"
    assert common.detect_kind(mlm_dir, "encoder") == "encoder"  # the base model of any head
    with pytest.raises(common.DeployError, match="kind 'mlm' asked"):
        common.detect_kind(encoder_dir, "mlm")


def test_encoder_matches_pytorch_batch_1_and_32_non_pad(encoder_dir, bert_tok):
    """Compared here without verify.check_outputs: 32 texts of mixed lengths, padded; then each text alone."""
    model = common.load_torch_model(encoder_dir, "encoder")
    session = ort.InferenceSession(str(encoder_dir / "onnx/model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    texts = [" ".join(t.split()[: 3 + i % 12]) for i, t in enumerate(TEXTS * 2)][:32]
    for batch in [texts, *[[t] for t in texts[:3]]]:
        enc = bert_tok(batch, padding=True, return_tensors="np")
        feed = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        got = session.run(["last_hidden_state"], feed)[0]
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
        mask = feed["attention_mask"].astype(bool)
        assert got.shape == want.shape
        assert np.abs(got - want)[mask].max() < 1e-4
        assert len(batch) == 1 or not mask.all()  # the batch of 32 has padding


@pytest.mark.parametrize("which", ["encoder", "mlm", "classifier"])
def test_check_outputs_passes_at_1e4(which, request, bert_tok, roberta_tok):
    folder = request.getfixturevalue(f"{which}_dir")
    tok = roberta_tok if which == "classifier" else bert_tok
    model = common.load_torch_model(folder, which)
    result = verify.check_outputs(model, which, folder / "onnx/model.onnx", tok, TEXTS)
    assert result.passed and result.tolerance == 1e-4
    assert 0 < result.value < 1e-4  # a real difference, measured (fp32 reorderings), not a zero from no comparison
    assert set(result.detail) == {"batch1", "batch32"}


def test_dynamic_axes_and_output_shapes(encoder_dir, mlm_dir, classifier_dir, bert_tok):
    for folder, name, tail in [
        (encoder_dir, "last_hidden_state", (32,)),
        (mlm_dir, "logits", (len(bert_tok),)),
        (classifier_dir, "logits", ()),
    ]:
        for onnx_file in ("model.onnx", "model_qint8.onnx"):
            session = ort.InferenceSession(str(folder / "onnx" / onnx_file))
            assert all(i.shape == ["batch_size", "sequence_length"] for i in session.get_inputs())
            assert [o.name for o in session.get_outputs()] == [name]
            for b, s in [(1, 5), (3, 17), (32, 100)]:
                feed = {i.name: np.ones((b, s), dtype=np.int64) for i in session.get_inputs()}
                out = session.run(None, feed)[0]
                assert out.shape == ((b, s, *tail) if tail else (b, 3))
    roberta_inputs = [i.name for i in ort.InferenceSession(str(classifier_dir / "onnx/model.onnx")).get_inputs()]
    assert roberta_inputs == ["input_ids", "attention_mask"]  # type_vocab_size 1: no token_type_ids, as optimum


def test_int8_size_and_weights(encoder_dir, classifier_dir):
    """Wide classifier (linear weights dominate): the int8 file is under half the fp32 file. The tiny encoder
    (hidden 32) is mostly graph structure (hundreds of small nodes), so only its weights shrink ~4x."""
    cls_fp32, cls_int8 = (classifier_dir / "onnx" / f for f in ("model.onnx", "model_qint8.onnx"))
    assert cls_int8.stat().st_size <= 0.5 * cls_fp32.stat().st_size
    fp32_bytes, int8_bytes = (
        _initializer_bytes(encoder_dir / "onnx/model.onnx"),
        _initializer_bytes(encoder_dir / "onnx/model_qint8.onnx"),
    )
    assert "INT8" not in fp32_bytes and int8_bytes.get("INT8", 0) > 0
    weights_int8 = sum(int8_bytes.get(k, 0) for k in ("FLOAT", "INT8", "UINT8"))
    assert weights_int8 < 0.3 * fp32_bytes["FLOAT"]  # 4-byte floats became 1-byte ints, plus scales
    nodes = {n.op_type for n in onnx.load(str(encoder_dir / "onnx/model_qint8.onnx")).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= nodes


def test_keep_embeddings_fp32(encoder_dir, tmp_path):
    def embedding_table_types(path):
        model = onnx.load(str(path))
        inits = {t.name: t.data_type for t in model.graph.initializer}
        gathers = [n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]
        return [inits[g] for g in gathers if g in inits]

    kept = quantize.quantize_int8(encoder_dir / "onnx/model.onnx", tmp_path / "k.onnx", exclude_embeddings=True)
    assert embedding_table_types(kept) == [onnx.TensorProto.FLOAT]
    assert embedding_table_types(encoder_dir / "onnx/model_qint8.onnx") != [onnx.TensorProto.FLOAT]
    per_channel = quantize.quantize_int8(encoder_dir / "onnx/model.onnx", tmp_path / "p.onnx", per_channel=True)
    assert per_channel.stat().st_size > 0
    with pytest.raises(common.DeployError, match="no such ONNX file"):
        quantize.quantize_int8(tmp_path / "missing.onnx", tmp_path / "x.onnx")


@pytest.mark.parametrize("which", ["encoder", "classifier"])
def test_int8_checks_pass_on_tiny_models(which, request, bert_tok, roberta_tok):
    folder = request.getfixturevalue(f"{which}_dir")
    tok = roberta_tok if which == "classifier" else bert_tok
    result = verify.check_int8(which, folder / "onnx/model.onnx", folder / "onnx/model_qint8.onnx", tok, TEXTS)
    assert result.passed, result.line()
    assert result.tolerance == verify.TOLERANCES[which]
    if which == "encoder":
        assert result.detail["cosine_mean"] > 0.99 and result.detail["recall_fp32"] > 0


def test_int8_mlm_agreement_on_random_tiny_model(mlm_dir, bert_tok):
    """A random MLM's logits are near-ties, so int8 flips a few top-1s (6% here, near the 5-point tolerance: the
    verdict is not asserted); the number must be the disagreement on masked positions and mostly agree."""
    result = verify.check_int8("mlm", mlm_dir / "onnx/model.onnx", mlm_dir / "onnx/model_qint8.onnx", bert_tok, TEXTS)
    assert result.detail["agreement"] > 0.85 and result.detail["masked"] >= len(TEXTS)
    assert result.value == pytest.approx(100 * (1 - result.detail["agreement"]))
    assert result.passed == (result.value <= 5.0)


def _corrupt_int8(src, dst):
    """The int8 graph with every int8 weight replaced by random values: a broken quantization."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(0)
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8:
            arr = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(rng.integers(-127, 128, arr.shape).astype(np.int8), t.name))
    onnx.save(model, str(dst))
    return dst


def test_corrupted_int8_fails_the_check(mlm_dir, bert_tok, tmp_path):
    """(An encoder is not used here: a random tiny BERT (init std 0.02) is nearly its embeddings plus residuals, so
    even random int8 weights keep its mean-pooled cosine above 0.99.)"""
    bad = _corrupt_int8(mlm_dir / "onnx/model_qint8.onnx", tmp_path / "bad_mlm.onnx")
    result = verify.check_int8("mlm", mlm_dir / "onnx/model.onnx", bad, bert_tok, TEXTS)
    assert not result.passed and result.value > result.tolerance
    assert result.line().startswith("FAIL int8 MLM top-1 disagreement")
    assert result.detail["agreement"] < 0.9


def test_recall_and_halves():
    first, second = verify.split_halves(["a b c d e", "too short", "one two three four"])
    assert first == ["a b", "one two"] and second == ["c d e", "three four"]
    vocab = sorted({w for t in TEXTS for w in t.lower().split()})

    def bag(texts):  # bag of words: halves of a text share few words, so recall < 1 but > chance
        out = np.array([[t.lower().split().count(w) for w in vocab] for t in texts], dtype=np.float32) + 1e-3
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    r = verify.recall_at_1_halves(bag, TEXTS)
    assert 1 / len(TEXTS) < r <= 1.0
    with pytest.raises(common.DeployError, match="at least 2 texts"):
        verify.recall_at_1_halves(bag, ["short"])


def test_read_texts(tmp_path):
    plain = tmp_path / "t.txt"
    plain.write_text("one text\n\nanother text\n")
    assert verify.read_texts(plain) == (["one text", "another text"], None)
    labeled = tmp_path / "t.jsonl"
    labeled.write_text('{"text": "good", "label": "POS"}\n{"text": "bad", "label": 0}\n')
    assert verify.read_texts(labeled, {"POS": 1}) == (["good", "bad"], [1, 0])
    labeled.write_text('{"text": "good"}\nnot json\n')
    with pytest.raises(common.DeployError, match=r"t.jsonl:2: expected a JSON object"):
        verify.read_texts(labeled)
    labeled.write_text('{"text": "good", "label": "NEG"}\n')
    with pytest.raises(common.DeployError, match="label 'NEG' is neither"):
        verify.read_texts(labeled, {"POS": 1})


def test_benchmark_records(encoder_dir):
    before = torch.get_num_threads()
    records = speed.benchmark(
        encoder_dir,
        {
            "onnxruntime-fp32": encoder_dir / "onnx/model.onnx",
            "onnxruntime-int8": encoder_dir / "onnx/model_qint8.onnx",
        },
        threads=1,
        batches=(1, 4),
        seq_len=16,
        warmup=1,
        repeats=3,
    )
    assert torch.get_num_threads() == before
    assert [(r["runtime"], r["batch"]) for r in records] == [
        (rt, b) for rt in ("pytorch-fp32", "onnxruntime-fp32", "onnxruntime-int8") for b in (1, 4)
    ]
    for r in records:
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["throughput_seq_s"] > 0 and r["threads"] == 1
    table = speed.markdown_table(records)
    assert table.count("\n| ") == 8 and "threads" in table.splitlines()[0]  # header, rule, 6 rows


def test_int8_isa():
    assert common.int8_isa({"isa": ["avx2", "avx512f", "avx512_vnni"]}) in ("avx512_vnni", "arm64")
    assert common.int8_isa({"isa": ["avx2"]}) in ("avx2", "arm64")
    assert quantize.int8_filename("avx512") == "model_qint8_avx512.onnx"


def test_cli_writes_folder_and_forced_failure_exits_1(encoder_dir, tmp_path, capsys):
    """Tolerance 0 forces the fp32 verdict to FAIL: the files are still written, one FAIL line, exit status 1."""
    out = tmp_path / "out"
    argv = [str(encoder_dir), "--output", str(out), "--quantize", "int8", "--exporter", "torchscript"]
    assert cli.main([*argv, "--bench", "--repeats", "1", "--threads", "1"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", quantize.int8_filename(), "checks.json", "bench.json", "bench.md"} <= names
    checks = json.loads((out / "checks.json").read_text())
    assert [c["passed"] for c in checks] == [True, True]
    capsys.readouterr()
    assert cli.main([*argv, "--tolerance", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("FAILED: FAIL fp32 ONNX vs PyTorch max |diff|")
    assert (out / "model.onnx").is_file() and not json.loads((out / "checks.json").read_text())[0]["passed"]


def test_cli_bad_inputs(tmp_path, capsys):
    assert cli.main([str(tmp_path)]) == 2
    assert "not a Hugging Face model folder (no config.json)" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert cli.main([str(tmp_path)]) == 2
    assert "model_type 'gpt2'" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForTokenClass"]}))
    assert cli.main([str(tmp_path)]) == 2
    assert "architecture 'BertForTokenClass' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()


def test_cli_error_midway_leaves_nothing(encoder_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def broken(*args, **kwargs):
        raise common.DeployError("disk full")

    monkeypatch.setattr(cli, "quantize_int8", broken)
    argv = [str(encoder_dir), "--output", str(out), "--quantize", "int8", "--exporter", "torchscript"]
    assert cli.main(argv) == 2
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # the old folder, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_export_model_leaves_eval_mode(bert_tok, tmp_path):
    model = tiny.bert_model(bert_tok, layers=1, mlm=False)
    export_model(model, "encoder", tmp_path / "m.onnx", exporter="torchscript")
    assert not model.training and not any(m.training for m in model.modules())


# ------------------------------------------------------------------------------------ static int8, the run's step
def test_static_int8_needs_calibration_and_tracks_fp32(encoder_dir, bert_tok, tmp_path):
    fp32 = encoder_dir / "onnx/model.onnx"
    nothing: list[list[dict[str, np.ndarray]] | None] = [None, []]
    for missing in nothing:
        with pytest.raises(common.DeployError, match="needs a calibration set"):
            quantize.quantize_static_int8(fp32, tmp_path / "s.onnx", missing)
    assert not (tmp_path / "s.onnx").exists()
    calib = [verify.tokenize(bert_tok, TEXTS[i : i + 8]) for i in range(0, 24, 8)]
    out = quantize.quantize_static_int8(fp32, tmp_path / "s.onnx", calib)
    nodes = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert nodes.count("QuantizeLinear") > 0 and "DynamicQuantizeLinear" not in nodes  # ranges fixed, not per call
    result = verify.check_int8("encoder", fp32, out, bert_tok, TEXTS)
    assert result.detail["cosine_mean"] > 0.99, result.line()


def test_cli_static_without_calibration_exits_2(encoder_dir, tmp_path, capsys):
    argv = [str(encoder_dir), "--output", str(tmp_path / "o"), "--quantize", "int8", "--int8-mode", "static"]
    assert cli.main(argv) == 2
    assert "--int8-mode static needs a calibration set: pass --calibration FILE" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny sentence-encoder run: teacher (BertModel, 4 layers), student from its layers 0 and 2 in RUN/student,
    shards of test_evaluate's documents, RUN/report.json from pretrain.evaluate, then the deployment step."""
    from data_prep.prepare import PrepareConfig, prepare
    from pretrain import evaluate as ev
    from pretrain.deploy.measure import RunDeploySettings, deploy_run
    from pretrain.export import save_student
    from pretrain.student import StudentConfig, build_student
    from tests.test_evaluate import _documents

    root = tmp_path_factory.mktemp("run")
    tok = tiny.bert_tokenizer()
    teacher = tiny.bert_model(tok, layers=4, hidden=32, mlm=False)
    student, _ = build_student(teacher, StudentConfig(layers=[0, 2]))
    t_dir = tiny.save_model_dir(root / "teacher", teacher, tok)
    s_dir = save_student(student.eval(), root / "run" / "student", t_dir, {"layer_map": [0, 2]})  # a project export
    (root / "docs.txt").write_text("\n\n".join(_documents()) + "\n")
    data = root / "data"
    cfg = PrepareConfig(
        sources=[f"text:{root / 'docs.txt'}"], tokenizer=str(t_dir), max_seq_length=48, output=str(data),
        valid_fraction=0.5, num_proc=0, progress=False,
    )  # fmt: skip
    prepare(cfg)
    kw = ev.EvalSettings(bench_batch=2, bench_length=8, bench_warmup=1, bench_iters=1, batch_size=16)
    report = ev.evaluate(str(s_dir), str(t_dir), data, root / "run", settings=kw)
    settings = RunDeploySettings(threads=1, batches=(1, 2), seq_len=16, warmup={1: 1, 2: 1}, repeats={1: 2, 2: 2})
    return {"run": root / "run", "report": report, "section": deploy_run(root / "run", t_dir, data, settings)}


def test_run_deployment_section(tiny_run):
    run, section = tiny_run["run"], tiny_run["section"]
    onnx_dir = run / "student" / "onnx"
    assert {"model.onnx", quantize.int8_filename(), "checks.json"} <= {p.name for p in onnx_dir.iterdir()}
    assert (run / "deploy" / "teacher" / "onnx" / "model.onnx").is_file() and (run / "deploy_speed.png").is_file()
    for who in ("student_fp32", "teacher_fp32"):
        c = section["checks"][who]
        assert c["passed"] and 0 < c["value"] < 1e-4 and set(c["detail"]) == {"batch1", "batch32"}
    int8 = section["int8"]["student"]
    # the fp32 graph on the report's own halves reproduces the report's PyTorch recall@1: the same protocol
    assert int8["detail"]["recall_fp32"] == pytest.approx(tiny_run["report"]["student"]["recall_at_1"])
    assert int8["passed"] == (int8["value"] <= 0.005) and int8["detail"]["cosine_mean"] > 0.9
    rows = section["speed"]
    assert [(r["model"], r["runtime"], r["batch"]) for r in rows] == [
        (m, rt, b) for m in ("teacher", "student") for rt in report_rows.RUNTIMES for b in (1, 2)
    ]
    t = {(r["runtime"], r["batch"]): r["throughput_seq_s"] for r in rows if r["model"] == "teacher"}
    for r in rows[6:]:
        assert r["speedup_same_runtime"] == pytest.approx(r["throughput_seq_s"] / t[(r["runtime"], r["batch"])])
        assert r["speedup_vs_pytorch_teacher"] == pytest.approx(r["throughput_seq_s"] / t[("pytorch-fp32", r["batch"])])
    saved = json.loads((run / "report.json").read_text())
    assert saved["deployment"] == json.loads((run / "deploy.json").read_text()) == json.loads(json.dumps(section))
    assert saved["student"] == json.loads(json.dumps(tiny_run["report"]["student"]))  # the report's numbers unchanged
    md = (run / "report.md").read_text()
    assert "## Deployment (ONNX fp32 and int8)" in md and "![deployment speed](deploy_speed.png)" in md
    assert md.count("**PASS**") + md.count("**FAIL**") == 3 and "threads for every runtime" in md
    # the student's model card is rewritten with the ONNX checks it now has (pretrain.card)
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "student" / "README.md")
    configs = {r.metric_config for r in card.data.eval_results}
    assert {"onnx-fp32", "onnx-int8"} <= configs and "## Deployment" in card.text, configs


def test_int8_outside_tolerance_is_written_and_marked_failing(tiny_run):
    """The retrieval check at a tolerance below any drop (-1) fails; the report line says FAIL with the number."""
    from pretrain.deploy.measure import RunDeploySettings, _retrieval_check
    from pretrain.deploy.retrieval import run_halves
    from pretrain.report_deployment import render_deployment_markdown

    run, report = tiny_run["run"], tiny_run["report"]
    seqs, pad = run_halves(report["meta"]["paths"]["data"], report["meta"]["retrieval"])
    onnx_dir = run / "student" / "onnx"
    s = RunDeploySettings(int8_tolerance=-1.0)
    check = _retrieval_check(onnx_dir / "model.onnx", onnx_dir / quantize.int8_filename(), seqs, pad, "mean", s)
    assert not check.passed and check.tolerance == -1.0
    section = {**tiny_run["section"], "int8": {**tiny_run["section"]["int8"], "student": dataclasses.asdict(check)}}
    line = next(ln for ln in render_deployment_markdown(section) if ln.startswith("| student int8"))
    assert line.endswith(f"| {100 * check.value:.2f}% | -100.0% | **FAIL** |")


def test_export_onnx_quantize_flags(encoder_dir, tmp_path, monkeypatch, capsys):
    """``python -m pretrain.export CKPT OUT --onnx --quantize int8`` runs the deployment export on OUT (the checkpoint
    export itself is stubbed with a copy of a model folder: tests/test_export.py covers it)."""
    import shutil

    from pretrain import export

    out = tmp_path / "student"

    def fake_export(checkpoint_dir, dest, tag=None, *, overwrite=False):
        shutil.copytree(encoder_dir, dest, ignore=shutil.ignore_patterns("onnx"))
        return dest

    monkeypatch.setattr(export, "export_checkpoint", fake_export)
    assert export.main([str(tmp_path / "ckpt"), str(out), "--onnx", "--quantize", "int8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"exported {out}" and lines[1].startswith("PASS fp32 ONNX vs PyTorch")
    assert {"model.onnx", quantize.int8_filename(), "checks.json"} <= {p.name for p in (out / "onnx").iterdir()}
    shutil.rmtree(out)
    assert export.main([str(tmp_path / "ckpt"), str(out)]) == 0 and not (out / "onnx").exists()  # no flag: no ONNX
