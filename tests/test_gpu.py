"""CUDA-only tests (marker ``gpu``): fp16 dynamic loss scaling through a real run, a half-precision teacher, the LM
heads' vocabulary padding, and ``train.compile=true`` through the trainer.

On a machine without CUDA they are deselected, and the run's summary says so (tests/conftest.py); on a GPU machine
``scripts/gpu_tests.sh`` runs them (docs/testing.md, "GPU tests"). Each compares against a reference computed in the
same test (fp32 teacher, unpadded products, eager model), with tolerances from the error budget of the precision
involved.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from pretrain.config import load
from pretrain.distill import DistillationModel
from pretrain.losses import LossConfig
from pretrain.masking import Masker, MaskingConfig
from pretrain.student import StudentConfig, build_student
from tests import tiny
from tests.helpers import REPO, assert_close_recorded, assets, read_metrics, tiny_overrides, train_in_process

pytestmark = pytest.mark.gpu

TINY = REPO / "configs" / "tiny-cpu.json"
TERMS = {"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0, "alpha_mse": 1.0, "alpha_att": 1.0, "alpha_val": 1.0}


def cuda_batch(tok, device):
    """Six masked sentences of tiny.corpus (ids, attention mask, labels) on ``device``."""
    enc = tok(tiny.corpus(1)[:6], padding=True, return_tensors="pt")
    masker = Masker.from_tokenizer(MaskingConfig(mlm_mask_prop=0.3), tok, seed=0)
    ids, labels = masker(enc["input_ids"], enc["attention_mask"], step=0, rank=0, micro_step=0)
    return ids.to(device), enc["attention_mask"].to(device), labels.to(device)


def student_and_teacher(tok, device):
    """A tiny BERT teacher and a perturbed every-other student (so every term is clearly non-zero), both on CUDA."""
    teacher = tiny.bert_model(tok)
    student, record = build_student(teacher, StudentConfig())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return student.eval().to(device), teacher.to(device), record["layer_map"]


def terms_and_grads(model, batch):
    """The logged loss terms and the student's gradients of the total loss."""
    model.student.zero_grad(set_to_none=True)
    loss, logs = model(*batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.student.named_parameters() if p.grad is not None}
    return {k: v.detach().float() for k, v in logs.items() if k.startswith("loss")}, grads


def test_fp16_overflow_halves_the_loss_scale_and_skips_the_step(tmp_path):
    """A real fp16 run (ZeRO-2, DeepSpeed's dynamic loss scaler) started at a loss scale of 2^30: the scaled gradients
    overflow fp16 (max 65,504) for the first steps; each such step is skipped (logged) and halves the scale
    (hysteresis 1), then the steps apply with the scale kept (no growth within 1,000 steps) and a finite loss."""
    out = tmp_path / "run"
    power, steps = 30, 36
    extra = {
        "deepspeed.fp16.enabled": True,
        "deepspeed.fp16.initial_scale_power": power,
        "deepspeed.fp16.hysteresis": 1,
        "deepspeed.fp16.loss_scale_window": 1000,
        "train.max_bad_steps": steps,
        "train.export_init": False,
        "train.eval_interval": 0,
        "train.save_interval": 0,
    }
    train_in_process(load(TINY, tiny_overrides("bert", out, steps=steps, **extra)))
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    skipped = [r["skipped_steps"] for r in recs]
    n_skip = sum(skipped)
    assert 1 <= n_skip < steps - 4, skipped
    assert skipped == [1] * n_skip + [0] * (steps - n_skip), skipped
    scales = [r["loss_scale"] for r in recs]
    assert scales[-1] == 2.0 ** (power - n_skip), (n_skip, scales)  # one halving per skipped step
    assert all(a in (b, 2 * b) for a, b in itertools.pairwise(scales)), scales
    assert all(math.isfinite(r["loss"]) for r in recs[n_skip:])


def test_half_precision_teacher_on_cuda(bert_tok):
    """The teacher in fp16 on the GPU (the trainer's choice with deepspeed.fp16) gives the fp32 teacher's loss terms
    and gradients within fp16's error budget: about 2^-11 relative per operation, a few layers deep, so 2% relative on
    each term and 5% on the gradients' norm of differences (a term computed on the wrong teacher, or zero, fails)."""
    device = torch.device("cuda")
    student, teacher, layer_map = student_and_teacher(bert_tok, device)
    batch = cuda_batch(bert_tok, device)
    cfg = LossConfig(**TERMS, temperature=2.0)
    ref_terms, ref_grads = terms_and_grads(DistillationModel(student, teacher, cfg, layer_map), batch)
    half = DistillationModel(copy.deepcopy(student), copy.deepcopy(teacher), cfg, layer_map)
    half.move_teacher(device, torch.float16)
    assert next(half.teacher.parameters()).dtype == torch.float16
    terms, grads = terms_and_grads(half, batch)
    assert all(float(v) > 1e-3 for v in ref_terms.values()), ref_terms
    assert_close_recorded("fp16 teacher terms vs fp32", terms, ref_terms, rtol=0.02, atol=1e-4)
    diff = torch.sqrt(sum(((grads[n] - g) ** 2).sum() for n, g in ref_grads.items()))
    norm = torch.sqrt(sum((g**2).sum() for g in ref_grads.values()))
    assert float(diff / norm) < 0.05, float(diff / norm)


def test_vocab_padding_on_cuda_gives_the_unpadded_values(bert_tok):
    """On CUDA the LM heads' products run padded to a multiple of 64 (pretrain.distill.aligned_vocab); the tiny
    vocabulary is not a multiple of 64, so the padded path really runs; its terms and gradients equal the unpadded
    ones to fp32 rounding (rtol 1e-5: the same products, reordered at most)."""
    assert len(bert_tok) % 64 != 0
    device = torch.device("cuda")
    student, teacher, layer_map = student_and_teacher(bert_tok, device)
    batch = cuda_batch(bert_tok, device)
    cfg = LossConfig(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, temperature=2.0)
    padded = DistillationModel(student, teacher, cfg, layer_map)
    padded.set_paths(naive=False, vocab_multiple=None)  # None: 64 on CUDA
    plain = DistillationModel(copy.deepcopy(student), teacher, cfg, layer_map)
    plain.set_paths(naive=False, vocab_multiple=1)
    t_pad, g_pad = terms_and_grads(padded, batch)
    t_plain, g_plain = terms_and_grads(plain, batch)
    assert_close_recorded("padded vs unpadded terms", t_pad, t_plain, rtol=1e-5, atol=1e-6)
    assert_close_recorded("padded vs unpadded grads", g_pad, g_plain, rtol=1e-4, atol=1e-6)


def dropout_free_teacher(root):
    """The tiny BERT teacher of tests/helpers.assets() with every dropout at 0 (so eager and compiled runs draw no
    random numbers and can be compared), saved next to it with the same tokenizer."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    src = assets()["bert"]
    model = AutoModelForMaskedLM.from_pretrained(src, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tiny.save_model_dir(root / "teacher-nodrop", model, AutoTokenizer.from_pretrained(src))


def test_compile_through_the_trainer_on_cuda(tmp_path):
    """``train.compile=true`` on CUDA: both encoders run compiled through the trainer, and the logged losses of 4
    steps equal the eager run's within inductor's reordering budget (fp32, rtol 1e-3 over 4 optimizer steps)."""
    teacher = dropout_free_teacher(tmp_path)
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"run-{compiled}"
        extra = {
            "teacher.name_or_path": str(teacher),
            "train.compile": compiled,
            "train.export_init": False,
            "train.eval_interval": 0,
            "train.save_interval": 0,
        }
        trainer = train_in_process(load(TINY, tiny_overrides("bert", out, steps=4, **extra)))
        assert trainer.model.compiled_modules() == (["student", "teacher"] if compiled else [])
        runs[compiled] = {r["step"]: r for r in read_metrics(out)}
    assert sorted(runs[True]) == [1, 2, 3, 4]
    for step in range(1, 5):
        got = {k: v for k, v in runs[True][step].items() if k.startswith("loss") and v is not None}
        want = {k: v for k, v in runs[False][step].items() if k.startswith("loss") and v is not None}
        assert_close_recorded(f"compiled vs eager step {step}", got, want, rtol=1e-3, atol=1e-6)
