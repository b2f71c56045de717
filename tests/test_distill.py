"""DistillationModel: gathered head == full logits then select, hooks == eager attentions, frozen unregistered
teacher."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from pretrain.distill import DistillationModel, default_layer_pairs
from pretrain.losses import LossConfig
from pretrain.masking import Masker, MaskingConfig
from pretrain.schema import ConfigError
from pretrain.student import StudentConfig, build_student
from tests import tiny
from tests.helpers import assert_close_recorded

ALL_TERMS: dict[str, Any] = {
    "alpha_ce": 5.0,
    "alpha_mlm": 2.0,
    "alpha_cos": 1.0,
    "alpha_mse": 1.0,
    "alpha_att": 1.0,
    "alpha_val": 1.0,
    "alpha_pool": 1.0,
}
REPR_TERMS: dict[str, Any] = {
    "alpha_ce": 0.0,
    "alpha_mlm": 0.0,
    "alpha_cos": 1.0,
    "alpha_mse": 1.0,
    "alpha_att": 1.0,
    "alpha_val": 1.0,
    "alpha_pool": 1.0,
}


def masked_batch(tok, seed=0, mlm_mask_prop=0.3):
    enc = tok(tiny.corpus(1)[:6], padding=True, return_tensors="pt")
    masker = Masker.from_tokenizer(MaskingConfig(mlm_mask_prop=mlm_mask_prop), tok, seed=seed)
    ids, labels = masker(enc["input_ids"], enc["attention_mask"], step=0, rank=0, micro_step=0)
    return ids, enc["attention_mask"], labels


def perturbed_student(teacher, cfg=None, seed=0):
    """A teacher-initialised student moved away from the teacher, so that every loss is clearly non-zero."""
    student, record = build_student(teacher, cfg or StudentConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return student.eval(), record  # eval: no dropout, so both paths see the same function


def run(model, batch):
    model.student.zero_grad(set_to_none=True)
    loss, logs = model(*batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), logs, grads


def assert_same(fast, naive, batch, logs_rtol=1e-5):
    _lf, logs_f, gf = run(fast, batch)
    _ln, logs_n, gn = run(naive, batch)
    assert_close_recorded("logged values, fast vs naive", logs_f, logs_n, rtol=logs_rtol, atol=1e-7)
    assert gf
    assert_close_recorded("gradients, fast vs naive", gf, gn, rtol=1e-4, atol=1e-6)
    return logs_f


@pytest.mark.parametrize("restrict,vocab_multiple", [(True, None), (False, None), (True, 64)])
def test_gathered_head_equals_full_logits(restrict, vocab_multiple, bert_tok):
    """Gathered heads (unpadded as on CPU, or padded to 64 columns as on CUDA) == full logits then select."""
    teacher = tiny.bert_model(bert_tok)
    student, record = perturbed_student(teacher)
    cfg = LossConfig(**ALL_TERMS, restrict_ce_to_mask=restrict)
    batch = masked_batch(bert_tok)
    fast = DistillationModel(student, teacher, cfg, record["layer_map"])
    fast.vocab_multiple = vocab_multiple
    assert teacher.config.vocab_size % 64  # so that the padded case pads
    logs = assert_same(fast, DistillationModel(student, teacher, cfg, record["layer_map"], naive=True), batch)
    for term in ("ce", "mlm", "cos", "mse", "att", "val", "pool"):
        assert float(logs[f"loss_{term}"]) > 1e-4, term
    assert int(logs["n_masked"]) == int((batch[2] != -100).sum()) > 0
    assert int(logs["n_tokens"]) == int(batch[1].sum())
    total = sum(
        ALL_TERMS[f"alpha_{t}"] * float(logs[f"loss_{t}"]) for t in ("ce", "mlm", "cos", "mse", "att", "val", "pool")
    )
    assert float(logs["loss"]) == pytest.approx(total, rel=1e-6)


@pytest.mark.slow
def test_compiled_parts_give_the_eager_values_without_recompiling(bert_tok):
    """``compile_parts`` (``train.compile``): the compiled encoders and logit losses give the eager model's losses and
    gradients, and a new masked-row count (every step in training) reuses the compiled graphs instead of recompiling.
    Inductor on CPU; about 50 s on 2 cores, nearly all of it compilation."""
    import torch._dynamo

    teacher = tiny.bert_model(bert_tok)
    student, record = perturbed_student(teacher)
    cfg = LossConfig(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0)  # DistilBERT's terms
    eager = DistillationModel(student, teacher, cfg, record["layer_map"])
    compiled = DistillationModel(copy.deepcopy(student), copy.deepcopy(teacher), cfg, record["layer_map"])
    compiled.compile_parts()
    torch._dynamo.reset()
    rows = []
    try:
        for i, prop in enumerate((0.3, 0.15, 0.5)):  # same [B, L], three numbers of masked rows
            batch = masked_batch(bert_tok, seed=i, mlm_mask_prop=prop)
            if i == 1:  # the first call compiled everything; from here a recompile is an error
                torch._dynamo.config.error_on_recompile = True
            # inductor fuses and reorders the float32 sums: the logged losses measured up to 5.8e-6 relative apart
            logs = assert_same(compiled, eager, batch, logs_rtol=1e-4)
            rows.append(int(logs["n_masked"]))
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    assert len(set(rows)) == 3, rows


def test_roberta_and_distilbert_students(bert_tok):
    rtok = tiny.roberta_tokenizer()
    teacher = tiny.roberta_model(rtok)
    student, record = perturbed_student(teacher)
    cfg = LossConfig(**ALL_TERMS)
    assert_same(
        DistillationModel(student, teacher, cfg, record["layer_map"]),
        DistillationModel(student, teacher, cfg, record["layer_map"], naive=True),
        masked_batch(rtok),
    )
    teacher = tiny.bert_model(bert_tok)
    student, record = perturbed_student(teacher, StudentConfig(architecture="distilbert"))
    assert type(student).__name__ == "DistilBertForMaskedLM"
    assert_same(
        DistillationModel(student, teacher, cfg, record["layer_map"]),
        DistillationModel(student, teacher, cfg, record["layer_map"], naive=True),
        masked_batch(bert_tok),
    )


def test_teacher_is_frozen_and_not_registered(bert_tok):
    teacher = tiny.bert_model(bert_tok)
    student, record = build_student(teacher, StudentConfig())
    model = DistillationModel(student, teacher, LossConfig(), record["layer_map"]).train()
    assert model.teacher is teacher and not teacher.training and model.student.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(k.startswith("student.") for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in student.parameters())
    loss, _ = model(*masked_batch(bert_tok))
    assert loss.dtype == torch.float32 and loss.requires_grad
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    query = dict(student.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"]
    assert query.grad is not None
    assert not any(m._forward_hooks for m in student.modules()), "hooks must not outlive the forward"


def test_relation_hooks_match_eager_attention(bert_tok):
    """loss_att from hooks under SDPA == KL between the eager models' own attention probabilities (last layers)."""
    teacher = tiny.bert_model(bert_tok)
    student, record = perturbed_student(teacher)
    cfg = LossConfig(alpha_ce=0, alpha_mlm=0, alpha_cos=0, alpha_att=1.0)
    ids, am, labels = masked_batch(bert_tok)
    _, logs = DistillationModel(student, teacher, cfg, record["layer_map"])(ids, am, labels)
    eager_t, eager_s = copy.deepcopy(teacher), copy.deepcopy(student)
    eager_t.set_attn_implementation("eager")
    eager_s.set_attn_implementation("eager")
    with torch.no_grad():
        a_t = eager_t(ids, attention_mask=am, output_attentions=True).attentions[-1].double()
        a_s = eager_s(ids, attention_mask=am, output_attentions=True).attentions[-1].double()
    keys = am.bool()[:, None, None, :]
    kl = torch.where(keys, a_t * (a_t.clamp_min(1e-300).log() - a_s.clamp_min(1e-300).log()), 0.0).sum(-1)
    queries = am.bool()[:, None, :].expand_as(kl)
    assert float(kl[queries].mean()) > 1e-3
    assert_close_recorded("loss_att vs eager KL", float(logs["loss_att"]), float(kl[queries].mean()), rtol=1e-5, atol=0)


def test_teacher_without_mlm_head(bert_tok):
    teacher = tiny.bert_model(bert_tok, mlm=False)
    student, record = perturbed_student(teacher)
    assert type(student).__name__ == "BertModel"
    cfg = LossConfig(**REPR_TERMS)
    logs = assert_same(
        DistillationModel(student, teacher, cfg, record["layer_map"]),
        DistillationModel(student, teacher, cfg, record["layer_map"], naive=True),
        masked_batch(bert_tok),
    )
    assert set(logs) == {"loss", "loss_cos", "loss_mse", "loss_att", "loss_val", "loss_pool", "n_masked", "n_tokens"}


def test_identical_student_gives_zero_distillation_losses(bert_tok):
    teacher = tiny.bert_model(bert_tok)
    student, record = build_student(teacher, StudentConfig(layers=[0, 1, 2, 3]))
    cfg = LossConfig(**ALL_TERMS, cos_layers="pairs", relation_layers="pairs")
    model = DistillationModel(student.eval(), teacher, cfg, record["layer_map"])
    assert model.layer_pairs == [[1, 1], [2, 2], [3, 3], [4, 4]]
    _, logs = model(*masked_batch(bert_tok))
    for term in ("ce", "cos", "mse", "att", "val", "pool"):
        assert abs(float(logs[f"loss_{term}"])) < 1e-5, term
    assert float(logs["loss_mlm"]) > 1.0


def test_default_layer_pairs():
    assert default_layer_pairs([0, 2, 4], 6) == [[1, 2], [2, 4], [3, 6]]
    assert default_layer_pairs([0, 2, 4, 7, 9, 11], 12) == [[1, 2], [2, 4], [3, 7], [4, 9], [5, 11], [6, 12]]


def test_random_width_student_uses_projections(bert_tok):
    teacher = tiny.bert_model(bert_tok)
    student, record = build_student(teacher, StudentConfig(init="random", hidden_size=16, num_hidden_layers=2))
    model = DistillationModel(student, teacher, LossConfig(**ALL_TERMS), record["layer_map"])
    assert isinstance(model.projections, torch.nn.ModuleDict) and set(model.projections) == {"h1", "h2"}
    assert model.projections["h2"].weight.shape == (32, 16)
    assert any(k.startswith("projections.") for k in model.state_dict())
    loss, _ = model(*masked_batch(bert_tok))
    loss.backward()
    assert model.projections is not None
    grads = {n: p.grad for n, p in model.projections.named_parameters()}
    assert grads["h1.weight"] is not None and grads["h2.weight"] is not None and grads["h2.weight"].abs().sum() > 0
    with pytest.raises(ConfigError, match=r"loss\.relation_heads"):
        DistillationModel(student, teacher, LossConfig(**ALL_TERMS, relation_heads=3), record["layer_map"])
    with pytest.raises(ConfigError, match=r"loss\.layer_pairs"):
        DistillationModel(student, teacher, LossConfig(**ALL_TERMS, layer_pairs=[[3, 1]]), record["layer_map"])


def test_half_precision_teacher(bert_tok):
    """A bf16 teacher gives each term within its budget of the fp32 teacher's value, term by term (not only the
    total, where a lost term could hide). Budget: bf16 keeps 8 significant bits (unit roundoff u = 2^-9); the tiny
    teacher's outputs carry a relative error growing with depth to ~4u (0.3% at the embeddings, 0.8% at the
    logits, measured); the terms are smooth in them, measured at most 7e-4 relative apart: each term within 2%
    (~10u; recorded share about 0.04), a term missing or zero is 100% off. The MLM term reads no teacher output:
    exactly equal. The logs stay fp32 / int64."""
    teacher = tiny.bert_model(bert_tok)
    student, record = perturbed_student(teacher)
    batch = masked_batch(bert_tok)
    cfg = LossConfig(**ALL_TERMS)
    ref, ref_logs = DistillationModel(student, teacher, cfg, record["layer_map"])(*batch)
    model = DistillationModel(student, copy.deepcopy(teacher), cfg, record["layer_map"])
    model.move_teacher("cpu", torch.bfloat16)
    loss, logs = model(*batch)
    assert loss.dtype == torch.float32 and all(v.dtype in (torch.float32, torch.int64) for v in logs.values())
    assert set(logs) == set(ref_logs)
    assert float(logs["loss_mlm"]) == float(ref_logs["loss_mlm"])
    for key in sorted(k for k in ref_logs if k.startswith("loss")):
        assert float(ref_logs[key]) > 1e-3, key  # every term clearly non-zero, so losing one shows
        assert_close_recorded(f"bf16 teacher {key}", float(logs[key]), float(ref_logs[key]), rtol=0.02, atol=0.0)
    assert_close_recorded("bf16 teacher loss", float(loss.detach()), float(ref.detach()), rtol=0.02, atol=0.0)


def test_aligned_vocab_gives_the_plain_products_values_and_gradients():
    """The padded vocabulary product (aligned_vocab) == the Linear's own product, forward and backward; the module's
    forward is restored afterwards and an aligned Linear is left alone."""
    from pretrain.distill import aligned_vocab

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 97)
    x = torch.randn(5, 16, requires_grad=True)
    ref = lin(x)
    ref.square().sum().backward()
    ref_grads = [t.grad.clone() for t in (x, lin.weight, lin.bias) if t.grad is not None]
    assert len(ref_grads) == 3
    for t in (x, lin.weight, lin.bias):
        t.grad = None
    with aligned_vocab(lin, 64):
        out = lin(x)
        assert out.shape == (5, 97) and out.stride(0) == 128  # computed as 128 columns, sliced
    out.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for got, want in zip((x.grad, lin.weight.grad, lin.bias.grad), ref_grads, strict=False):
        torch.testing.assert_close(got, want)
    assert "forward" not in vars(lin)
    aligned = torch.nn.Linear(16, 64)
    with aligned_vocab(aligned, 64):
        assert aligned(x).stride(0) == 64


def test_vocab_projection_found_for_each_head_layout():
    """aligned_vocab needs the head's vocabulary Linear: BERT, RoBERTa, DistilBERT (a chain of siblings), ELECTRA."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        DistilBertConfig,
        DistilBertForMaskedLM,
        ElectraConfig,
        ElectraForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    from pretrain.distill import vocab_projection
    from pretrain.student import mlm_head

    small: dict[str, Any] = {
        "vocab_size": 101,
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
    }
    models = [
        BertForMaskedLM(BertConfig(**small)),
        RobertaForMaskedLM(RobertaConfig(**small)),
        ElectraForMaskedLM(ElectraConfig(embedding_size=16, **small)),
        DistilBertForMaskedLM(DistilBertConfig(vocab_size=101, dim=16, n_layers=1, n_heads=2, hidden_dim=32)),
    ]
    for model in models:
        proj = vocab_projection(mlm_head(model), 101)
        assert isinstance(proj, torch.nn.Linear) and proj.out_features == 101, type(model).__name__
        assert proj.weight is model.get_output_embeddings().weight, type(model).__name__
