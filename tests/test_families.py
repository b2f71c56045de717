"""The family matrix (issue 21): every encoder family of tests/families.py through every stage of the pipeline.

prepare (``python -m data_prep prepare`` with the family's tokenizer) -> a student by every layer-map kind (every
other, DistilBERT's list, an explicit list, random init), each copied tensor equal to its source and the saved student
reloading to the same function -> every loss term that applies to the family, finite and with gradients -> one
DeepSpeed launch of 2 CPU ranks that trains each family in turn (a straight run, and the same run stopped by SIGTERM
and resumed; their losses equal) -> the export reloads to the trained module's outputs (1e-5) and loads in
``AutoModel``, ``AutoModelForMaskedLM`` (MLM teachers) and ``SentenceTransformer`` (sentence-transformers teachers)
-> ``pretrain.downstream`` fine-tunes it -> width pruning, or a refusal naming what the family lacks.

Each test is parametrized by family, so a failure names it. README's family table and docs/families.md name these
tests for each cell.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pretrain.config import load
from pretrain.schema import ConfigError
from pretrain.student import StudentConfig, build_student, find_layer_list
from tests import families as F
from tests.helpers import PY, REPO, assert_same_losses, env, free_port, losses

TINY = REPO / "configs" / "tiny-cpu.json"
NAMES = list(F.FAMILIES)
STEPS, STOP = 3, 1  # the 2-rank runs: 3 steps; SIGTERM while step 2 runs, so the checkpoint is at step 2
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France, and Berlin of Germany."]

# width pruning refused, and the words the refusal must contain (what the family lacks)
PRUNE_REFUSED = {
    "electra-generator": "needs embedding_size == hidden_size",
    "distilbert": "does not support the distilbert family",
    "mpnet": "cannot drop heads",  # its relative-position bias has one column per head, shared by all layers
    "st-mpnet": "cannot drop heads",
}
FFN_ONLY = ("mpnet", "st-mpnet")  # what the refusal offers instead: every head kept, the feed-forward layers pruned


def terms(name: str) -> dict[str, float]:
    """Every loss term that applies to the family: the logit terms with an MLM head, the pooled term for a sentence
    encoder, the hidden-state and MiniLM relation terms for all."""
    fam = F.FAMILIES[name]
    out = {"alpha_cos": 1.0, "alpha_mse": 1.0, "alpha_att": 1.0, "alpha_val": 1.0}
    out.update({"alpha_ce": 5.0, "alpha_mlm": 2.0} if fam.mlm else {"alpha_ce": 0.0, "alpha_mlm": 0.0})
    if fam.sentence:
        out["alpha_pool"] = 1.0
    return out


def overrides(name: str, **extra) -> list[str]:
    """tiny-cpu.json pointed at the family's teacher and shards, its loss terms, a 3-step run of 4 sequences."""
    items = {
        "teacher.name_or_path": str(F.teacher_dir(name)),
        "data.dir": str(F.shards(name)),
        "train.max_steps": STEPS,
        "train.save_interval": 0,
        "train.eval_interval": 0,
        "train.evaluate": False,
        "train.export_init": False,
        "train.tensorboard": False,
        "deepspeed.train_batch_size": 4,
        "deepspeed.train_micro_batch_size_per_gpu": 2,
        "deepspeed.gradient_accumulation_steps": None,
        "deepspeed.scheduler.params.total_num_steps": STEPS,
        **{f"loss.{k}": v for k, v in terms(name).items()},
        **extra,
    }
    if name == "xlm-roberta":  # configs/xlmr.json's masking: whole words on SentencePiece pieces
        items["masking.whole_word_mask"] = True
    if name == "modernbert":  # DistilBERT's map [0, 3, 5]: kinds full, full, sliding, not the positional cadence
        items.setdefault("student.layers", "distilbert")
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in items.items()]


@functools.cache
def teacher(name: str):
    """The family's teacher loaded the way a run loads it (preflight, then ``pretrain.teacher.load_teacher``)."""
    from pretrain.teacher import load_teacher, preflight

    cfg = load(TINY, overrides(name))
    return load_teacher(cfg.teacher, preflight(cfg))


def batch(name: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(F.teacher_dir(name))(TEXTS, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def output(model, b) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(**b)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --------------------------------------------------------------------------------------------------------- prepare
@pytest.mark.parametrize("name", NAMES)
def test_prepare_with_the_family_tokenizer(name):
    from transformers import AutoTokenizer

    from data_prep.shards import load_manifest
    from pretrain.masking import word_starts_from_tokens

    manifest = load_manifest(F.shards(name))
    tok = AutoTokenizer.from_pretrained(F.teacher_dir(name))
    assert manifest["max_seq_length"] == F.SEQ and manifest["dtype"] == "uint16"
    assert manifest["splits"]["train"]["num_sequences"] > 0 and manifest["tokenizer"]["vocab_size"] == len(tok)
    rows = np.fromfile(F.shards(name) / "train-00000.bin", dtype=np.uint16)[: F.SEQ]
    words = set(re.findall(r"[a-z]+", " ".join(F.tiny.corpus(1)).lower()))
    decoded = re.findall(
        r"[a-z]+", str(tok.decode(rows[1:-1])).lower()
    )  # the corpus comes back (the ends may cut a word)
    assert rows[0] == tok.cls_token_id and sum(w in words for w in decoded) >= len(decoded) - 2 >= 3, decoded
    vocab: list[str | None] = list(tok.convert_ids_to_tokens(list(range(len(tok)))))
    marker = {"wordpiece": "##", "bpe": "Ġ", "unigram": "▁"}[F.FAMILIES[name].tokenizer]
    assert any((p or "").startswith(marker) for p in vocab), (name, vocab[:40])
    starts = word_starts_from_tokens(vocab)  # whole-word masking reads the family's word-start marker
    assert 0 < starts.sum() < len(tok)


# --------------------------------------------------------------------------------------------------------- surgery
LAYER_MAPS: dict[str, str | list[int]] = {
    "every_other": "every_other",
    "distilbert": "distilbert",
    "explicit": [1, 3],
    "random": "every_other",
}
# ModernBERT's layer 0 has no attention norm, so its maps start at 0 (a map that does not is refused:
# tests/test_families_core.py); [0, 1, 4] takes kinds full, sliding, sliding
EXPLICIT: dict[str, list[int]] = {"modernbert": [0, 1, 4]}
NO_SDPA = ("deberta-v2", "mpnet")  # no SDPA path in transformers: eager, said once (tests/test_families_core.py)
# cells not supported yet, each with the bug it waits for (/work/notes/fam-bugs.md); README's table marks them.
# Empty: DistilBERT's random init and DeBERTa-v2's conv-layer pruning were fixed (famcore21 dc09db6).
NOT_SUPPORTED: dict[tuple[str, str], str] = {}


def _kinds(config, layer_map=None) -> list[str] | None:
    kinds = getattr(config, "layer_types", None)
    return None if kinds is None else [kinds[i] for i in (layer_map or range(len(kinds)))]


SURGERY = [(n, k) for n in NAMES for k in LAYER_MAPS if (n, k) not in NOT_SUPPORTED]


@pytest.mark.parametrize("name,kind", SURGERY, ids=[f"{n}-{k}" for n, k in SURGERY])
def test_student_by_every_layer_map(name, kind, tmp_path):
    """Copied tensors equal their sources; student layer i is teacher layer map[i]; the saved student reloads with
    the same outputs (and, for ModernBERT, ``layer_types`` of the copied layers)."""
    t = teacher(name)
    if kind == "random":
        cfg = StudentConfig(layers="every_other", init="random", num_hidden_layers=2, hidden_size=16)
    else:
        cfg = StudentConfig(layers=EXPLICIT.get(name, LAYER_MAPS[kind]) if kind == "explicit" else LAYER_MAPS[kind])
    student, record = build_student(t, cfg)
    layer_map = record["layer_map"]
    kernel = "eager" if F.FAMILIES[name].model_type in NO_SDPA else "sdpa"
    assert t.config._attn_implementation == student.config._attn_implementation == kernel, name
    t_sd, s_sd = t.state_dict(), student.state_dict()
    if kind == "random":
        assert student.config.hidden_size == 16 and student.config.num_hidden_layers == 2
    else:
        assert student.config.num_hidden_layers == len(layer_map)
        copied = {k: v for k, v in record["copied"].items() if v in t_sd}
        assert set(s_sd) <= set(record["copied"]) | set(record.get("initialized", [])), name
        assert copied and all(torch.equal(s_sd[k], t_sd[v]) for k, v in copied.items())
        _, s_layers = find_layer_list(student)
        _, t_layers = find_layer_list(t)
        for i, j in enumerate(layer_map):
            for (ks, ps), (kt, pt) in zip(
                s_layers[i].state_dict().items(), t_layers[j].state_dict().items(), strict=True
            ):
                assert ks == kt and torch.equal(ps, pt), (name, i, j, ks)
        if _kinds(t.config) is not None:
            assert _kinds(student.config) == _kinds(t.config, layer_map), name
    student.save_pretrained(tmp_path / "s")
    from transformers import AutoModel, AutoModelForMaskedLM

    cls = AutoModelForMaskedLM if F.FAMILIES[name].mlm else AutoModel
    reloaded = cls.from_pretrained(tmp_path / "s")
    assert _kinds(reloaded.config) == _kinds(student.config)
    b = batch(name)
    assert (output(reloaded, b) - output(student, b)).abs().max() <= 1e-5, name


# ---------------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("name", NAMES)
def test_every_loss_term_is_finite_with_gradients(name):
    """Each applicable term alone: finite, positive for a student moved off the teacher, and it sends a finite,
    non-zero gradient to the student (all terms together: the 2-rank run below)."""
    from transformers import AutoTokenizer

    from pretrain.distill import DistillationModel
    from pretrain.losses import LossConfig
    from pretrain.masking import Masker, MaskingConfig

    t = teacher(name)
    student, record = build_student(t, StudentConfig(layers="distilbert"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    student.eval()
    tok = AutoTokenizer.from_pretrained(F.teacher_dir(name))
    b = batch(name)
    masker = Masker.from_tokenizer(MaskingConfig(mlm_mask_prop=0.3), tok, seed=0)
    ids, labels = masker(b["input_ids"], b["attention_mask"], step=0, rank=0, micro_step=0)
    all_terms = {k: v for k, v in terms(name).items() if v > 0}
    for term in all_terms:
        weights: dict[str, Any] = {k: (v if k == term else 0.0) for k, v in terms(name).items()}
        model = DistillationModel(student, t, LossConfig(**weights), record["layer_map"])
        student.zero_grad(set_to_none=True)
        loss, logs = model(ids, b["attention_mask"], labels)
        loss.backward()
        value = float(logs["loss_" + term.removeprefix("alpha_")])
        assert math.isfinite(value) and value > 0, (name, term, value)
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(x).all() for x in grads), (name, term)
        assert any(x.abs().sum() > 0 for x in grads), (name, term)


# ------------------------------------------------------------------------- 2 ranks: run, SIGTERM, resume, export
@pytest.fixture(scope="module")
def ranks_run():
    """One DeepSpeed launch, 2 CPU ranks (tests/family_ranks.py): each family's straight run, then the same run
    stopped by SIGTERM and resumed. Returns {family: its root folder}."""
    root = Path(tempfile.mkdtemp(prefix="family-ranks-"))
    atexit.register(shutil.rmtree, root, True)
    plan: dict[str, Any] = {"config": str(TINY), "stop": STOP, "families": []}
    for name in NAMES:
        (root / name).mkdir()
        plan["families"].append({"name": name, "root": str(root / name), "overrides": overrides(name)})
    (root / "plan.json").write_text(json.dumps(plan))
    cmd = [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += ["--module", "tests.family_ranks", str(root / "plan.json")]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    (root / "log.txt").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return {name: root / name for name in NAMES}


def _ok(ranks_run, name) -> Path:
    root = ranks_run[name]
    result = json.loads((root / "result.json").read_text())
    assert result.get("ok"), f"{name}: the 2-rank run failed:\n{result.get('error')}"
    return root


@pytest.mark.parametrize("name", NAMES)
def test_two_rank_run_and_sigterm_resume_equal_the_straight_run(ranks_run, name):
    root = _ok(ranks_run, name)
    straight, stopped = losses(root / "straight"), losses(root / "stopped")
    assert sorted(straight) == sorted(stopped) == list(range(1, STEPS + 1)), (name, sorted(stopped))
    assert_same_losses(straight, stopped, range(1, STEPS + 1))
    assert all(math.isfinite(v) for s in straight.values() for v in s.values() if v is not None)
    logged = {k.removeprefix("loss_") for k in straight[STEPS] if k != "loss"}
    assert logged >= {k.removeprefix("alpha_") for k, v in terms(name).items() if v > 0}, (name, logged)
    ckpt = root / "stopped" / "checkpoints"
    assert (ckpt / f"step_{STOP + 1:08d}").is_dir() and (ckpt / "latest").read_text() == f"step_{STEPS:08d}"


@pytest.mark.parametrize("name", NAMES)
def test_export_reloads_to_the_trained_module(ranks_run, name):
    from transformers import AutoModel, AutoModelForMaskedLM

    root = _ok(ranks_run, name)
    export = root / "straight" / "student"
    want = torch.load(root / "trained_outputs.pt")
    b = {"input_ids": want["input_ids"], "attention_mask": want["attention_mask"]}
    fam = F.FAMILIES[name]
    model = (AutoModelForMaskedLM if fam.mlm else AutoModel).from_pretrained(export)
    diff = float((output(model, b) - want["output"]).abs().max())
    assert diff <= 1e-5, (name, diff)
    bare = AutoModel.from_pretrained(export)
    assert bare.config.num_hidden_layers == fam.layers // 2 and _kinds(bare.config) == _kinds(model.config), name
    if name == "modernbert":  # the exported layer_types are the copied teacher layers' kinds
        assert (
            _kinds(bare.config)
            == _kinds(teacher(name).config, [0, 3, 5])
            == ["full_attention"] * 2 + ["sliding_attention"]
        )
    if fam.sentence:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(export), device="cpu")
        emb = st.encode(TEXTS, convert_to_tensor=True)
        hidden = output(bare, b)
        mask = b["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        assert (emb - mean).abs().max() <= 1e-5, name


@pytest.mark.parametrize("name", NAMES)
def test_downstream_fine_tunes_the_export(ranks_run, name, tmp_path):
    from pretrain import downstream as ds

    root = _ok(ranks_run, name)
    folder = tmp_path / "task"
    folder.mkdir()
    things = ("food", "film", "play", "city", "book", "song")
    for i, split in enumerate(("train", "dev", "test")):  # distinct texts per split (splits are deduplicated)
        rows = [(f"the {w} {i} is good and fine", "pos") for w in things]
        rows += [(f"the {w} {i} is bad and dull", "neg") for w in things]
        (folder / f"{split}.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    res = ds.run_downstream(
        [f"csv:{folder}"],
        {"student": str(root / "straight" / "student")},
        tmp_path / "out",
        seeds=1,
        overrides={"epochs": 1, "lr": 1e-3, "batch_size": 4, "max_length": 16},
        plot=False,
        progress=lambda s: None,
    )
    run = res["tasks"][f"csv:{folder}"]["results"]["student"]["runs"][0]
    assert math.isfinite(run["score"]) and math.isfinite(run["loss_last"]), (name, run)


# --------------------------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("name", [n for n in NAMES if (n, "prune") not in NOT_SUPPORTED])
def test_width_pruning_or_a_clear_refusal(name, tmp_path):
    """Width 32 -> 16 (2 of 4 heads, 32 feed-forward neurons) on teacher layers 0, 2, or one ConfigError naming what
    the family lacks; MPNet then prunes its feed-forward layers only. The pruned student reloads to its outputs."""
    from transformers import AutoModel, AutoModelForMaskedLM

    from pretrain.prune import calibration_batches

    t = teacher(name)
    cal = calibration_batches(F.shards(name), n=8, seed=0, batch_size=4)
    cfg = StudentConfig(layers="every_other", init="prune", hidden_size=16, num_attention_heads=2, intermediate_size=32)
    if name in PRUNE_REFUSED:
        with pytest.raises(ConfigError, match=PRUNE_REFUSED[name]):
            build_student(t, cfg, cal)
        if name not in FFN_ONLY:
            return
        cfg = StudentConfig(layers="every_other", init="prune", intermediate_size=32)
    student, _ = build_student(t, cfg, cal)
    fam = F.FAMILIES[name]
    assert student.config.hidden_size == (cfg.hidden_size or F.HIDDEN), name
    assert student.config.num_hidden_layers == fam.layers // 2 and student.config.intermediate_size == 32, name
    b = batch(name)
    out = output(student, b)
    assert torch.isfinite(out).all()
    student.save_pretrained(tmp_path / "pruned")
    reloaded = (AutoModelForMaskedLM if fam.mlm else AutoModel).from_pretrained(tmp_path / "pruned")
    assert (output(reloaded, b) - out).abs().max() <= 1e-5, name


# --------------------------------------------------------------------------------------------------------- configs
def test_family_configs_validate_for_a_cluster(capsys):
    """configs/modernbert.json, deberta-v3.json and xlmr.json validate as `python -m pretrain.config C --world-size 8
    --quiet` does, with their 4096-sequence steps on 8 GPUs."""
    from pretrain import config as C
    from pretrain import ds_config as D

    for name in ("modernbert", "deberta-v3", "xlmr"):
        assert C.main([str(REPO / "configs" / f"{name}.json"), "--world-size", "8", "--quiet"]) == 0, name
        cfg = C.load(REPO / "configs" / f"{name}.json")
        ds = D.build(cfg.deepspeed, max_steps=cfg.train.max_steps, world_size=8, cuda=True)
        assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (4096, 32), name
    assert "error" not in capsys.readouterr().err.lower()


def test_modernbert_config_keeps_the_cadence_of_half_the_layers():
    from transformers import ModernBertConfig

    from pretrain.student import resolve_layer_map

    cfg = load(REPO / "configs" / "modernbert.json")
    teacher_kinds = (
        ModernBertConfig(num_hidden_layers=22).layer_types or []
    )  # ModernBERT-base: 22 layers, global every 3
    layer_map = resolve_layer_map(cfg.student.layers, 22, teacher_kinds)
    assert len(layer_map) == 11 and layer_map[0] == 0
    assert [teacher_kinds[i] for i in layer_map] == ModernBertConfig(num_hidden_layers=11).layer_types
    assert cfg.loss.active() == {"ce": 5.0, "mlm": 2.0, "cos": 1.0} and cfg.deepspeed["bf16"]["enabled"]


def test_deberta_v3_config_has_no_logit_terms():
    from pretrain.student import resolve_layer_map

    cfg = load(REPO / "configs" / "deberta-v3.json")
    assert cfg.loss.active() == {"cos": 1.0, "mse": 1.0, "att": 1.0, "val": 1.0}
    assert resolve_layer_map(cfg.student.layers, 12) == [0, 2, 4, 7, 9, 11]
    assert cfg.masking.word_mask == 0.0 and cfg.masking.word_keep == 1.0  # inputs intact: no MLM term reads them


def test_xlmr_config_masks_whole_sentencepiece_words_into_uint32_shards():
    import numpy as np
    from transformers import AutoTokenizer

    from data_prep.tokenizer import token_dtype
    from pretrain.masking import Masker

    cfg = load(REPO / "configs" / "xlmr.json")
    assert cfg.masking.whole_word_mask and cfg.student.layers == "every_other"
    assert token_dtype(250002) == np.uint32  # xlm-roberta-base's vocabulary
    tok = AutoTokenizer.from_pretrained(F.teacher_dir("xlm-roberta"))  # the same kind: Unigram pieces, ▁ word starts
    masker = Masker.from_tokenizer(cfg.masking, tok, seed=0)
    enc = tok(["distillation trains a small student"] * 64, return_tensors="pt")
    _, labels = masker(enc["input_ids"], enc["attention_mask"], step=0, rank=0, micro_step=0)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    words = np.cumsum([p.startswith("▁") for p in pieces])  # word index of each piece ([CLS]-like <s> is word 0)
    assert (labels != -100).any()
    for row in (labels != -100).numpy():
        for w in set(words[row]):  # a masked word has all its pieces masked
            assert row[(words == w) & (np.arange(len(pieces)) < len(pieces) - 1)].all(), (pieces, row)
