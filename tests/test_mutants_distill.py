"""pretrain/distill.py: every loss term of DistillationModel against plain torch written here from the raw teacher
and student outputs, and its gradient (mutation testing, docs/testing.md "Mutation testing").

The references take the models' hidden states (``output_hidden_states``) and recompute the queries, keys and values
of a layer from its input hidden state with the layer's own Linear modules; nothing from pretrain.losses is used."""

from __future__ import annotations

import copy
import math
import re
import types
from typing import Any

import pytest
import torch

from pretrain.distill import (
    DistillationModel,
    _Captured,
    find_qkv,
    init_from_channels,
    logit_losses,
    vocab_projection,
)
from pretrain.families import mlm_head
from pretrain.losses import LossConfig
from pretrain.masking import Masker, MaskingConfig
from pretrain.schema import ConfigError
from pretrain.student import StudentConfig, build_student
from tests import tiny
from tests.test_wiring import (
    check_against_reference,
    loss_cfg,
    masked_batch,
    perturb,
    qkv,
    relation_kl,
    token_mse,
)

T = 3.0
PAIRS = [[1, 2], [2, 4]]  # student 2 layers (teacher layers 0, 2), teacher 4


def _batch(tok):
    enc = tok(tiny.corpus(1)[:5], padding=True, return_tensors="pt")
    masker = Masker.from_tokenizer(MaskingConfig(mlm_mask_prop=0.3), tok, seed=3)
    ids, labels = masker(enc["input_ids"], enc["attention_mask"], step=0, rank=0, micro_step=0)
    return ids, enc["attention_mask"], labels


def _models(tok, **student_cfg):
    teacher = tiny.bert_model(tok)
    student, record = build_student(teacher, StudentConfig(layers=[0, 2], **student_cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return teacher, student.eval(), record


def _kl_rows(t_logits, s_logits):
    """sum over the last axis of p_t (log p_t - log p_s), per row."""
    pt = torch.softmax(t_logits.double(), -1)
    return (pt * (torch.log(pt) - torch.log_softmax(s_logits.double(), -1))).sum(-1)


def _relations(a, b, am, heads):
    bsz, length, dim = a.shape
    d = dim // heads
    a = a.double().reshape(bsz, length, heads, d).permute(0, 2, 1, 3)
    b = b.double().reshape(bsz, length, heads, d).permute(0, 2, 1, 3)
    scores = a @ b.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~am.bool()[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1)


def _relation_kl(pt, ps, am):
    kl = torch.where(pt > 0, pt * (torch.log(pt.clamp_min(1e-300)) - torch.log(ps.clamp_min(1e-300))), 0.0).sum(-1)
    return kl[am.bool()[:, None, :].expand_as(kl)].mean()


def _reference(teacher, student, batch, *, restrict, cos_pairs, projections=None):
    """Every term from the raw outputs, as written in the papers (docs in pretrain/losses.py)."""
    ids, am, labels = batch
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
    s = student(input_ids=ids, attention_mask=am, output_hidden_states=True)
    real = am.bool()
    proj = (lambda i, h: projections[f"h{i}"](h)) if projections is not None else (lambda i, h: h)
    pos = (labels != -100) | real if not restrict else labels != -100
    out = {}
    out["ce"] = _kl_rows(t.logits[pos] / T, s.logits[pos] / T).mean() * T**2
    out["mlm"] = torch.nn.functional.cross_entropy(s.logits[labels != -100].double(), labels[labels != -100])

    def cos_term(hs, ht):
        c = (hs.double() * ht.double()).sum(-1) / (hs.double().norm(dim=-1) * ht.double().norm(dim=-1))
        return (1 - c)[real].mean()

    def mse_term(hs, ht):
        return ((hs.double() - ht.double()) ** 2)[real].mean()

    if cos_pairs:
        out["cos"] = sum(cos_term(proj(i, s.hidden_states[i]), t.hidden_states[j]) for i, j in PAIRS) / len(PAIRS)
    else:
        out["cos"] = cos_term(proj(2, s.hidden_states[-1]), t.hidden_states[-1])
    out["mse"] = sum(mse_term(proj(i, s.hidden_states[i]), t.hidden_states[j]) for i, j in PAIRS) / len(PAIRS)

    def pool(h):
        m = real[..., None].double()
        return (h.double() * m).sum(1) / m.sum(1)

    out["pool"] = ((pool(proj(2, s.hidden_states[-1])) - pool(t.hidden_states[-1])) ** 2).mean()
    # MiniLM relations of the last layers: Q, K, V recomputed from each last layer's input hidden state
    heads = student.config.num_attention_heads
    ls, lt = student.bert.encoder.layer[-1].attention.self, teacher.bert.encoder.layer[-1].attention.self
    hs_in, ht_in = s.hidden_states[-2], t.hidden_states[-2]
    out["att"] = _relation_kl(
        _relations(lt.query(ht_in), lt.key(ht_in), am, heads), _relations(ls.query(hs_in), ls.key(hs_in), am, heads), am
    )
    out["val"] = _relation_kl(
        _relations(lt.value(ht_in), lt.value(ht_in), am, heads),
        _relations(ls.value(hs_in), ls.value(hs_in), am, heads),
        am,
    )
    return out


WEIGHTS: dict[str, float] = {"ce": 5.0, "mlm": 2.0, "cos": 1.5, "mse": 0.7, "att": 1.1, "val": 0.9, "pool": 3.0}


@pytest.mark.parametrize("restrict,cos_pairs", [(True, False), (False, True)])
def test_every_term_and_its_gradient_against_plain_torch(bert_tok, restrict, cos_pairs):
    """KL at T = 3 on the masked / every real position, MLM, cosine (last layer / layer pairs), MSE over pairs,
    pooled MSE, attention and value relations: each logged term, the total and the student's gradients."""
    teacher, student, record = _models(bert_tok)
    batch = _batch(bert_tok)
    alphas: dict[str, Any] = {f"alpha_{k}": v for k, v in WEIGHTS.items()}
    cfg = LossConfig(
        **alphas,
        temperature=T,
        restrict_ce_to_mask=restrict,
        cos_layers="pairs" if cos_pairs else "last",
        layer_pairs=PAIRS,
    )
    model = DistillationModel(student, teacher, cfg, record["layer_map"])
    assert model.projections is None
    loss, logs = model(*batch)
    ref = _reference(teacher, copy.deepcopy(student), batch, restrict=restrict, cos_pairs=cos_pairs)
    for k, v in ref.items():
        assert float(v.detach()) > 1e-4, k
        assert float(logs[f"loss_{k}"]) == pytest.approx(float(v.detach()), rel=1e-4, abs=1e-7), k
    total = sum(WEIGHTS[k] * ref[k] for k in WEIGHTS)
    assert float(loss.detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    assert int(logs["n_masked"]) == int((batch[2] != -100).sum())
    assert int(logs["n_tokens"]) == int(batch[1].sum())
    # gradients: the module's loss vs the reference total, on the same student
    student.zero_grad(set_to_none=True)
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    ref_total = sum(
        WEIGHTS[k] * v for k, v in _reference(teacher, student, batch, restrict=restrict, cos_pairs=cos_pairs).items()
    )
    ref_total.backward()
    want = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for n in got:
        torch.testing.assert_close(got[n].double(), want[n].double(), rtol=1e-3, atol=1e-6, msg=n)


def test_projected_terms_of_a_narrower_student(bert_tok):
    """A random 16-wide student: cos / mse / pool go through the TinyBERT projections h1, h2 (one per student
    hidden state read) and the reference applies the same Linear modules."""
    teacher = tiny.bert_model(bert_tok)
    student, record = build_student(teacher, StudentConfig(init="random", hidden_size=16, num_hidden_layers=2))
    student.eval()
    batch = _batch(bert_tok)
    weights = {"cos": 1.0, "mse": 1.0, "pool": 1.0}
    cfg = LossConfig(alpha_ce=0, alpha_mlm=0, alpha_cos=1.0, alpha_mse=1.0, alpha_pool=1.0, layer_pairs=PAIRS)
    model = DistillationModel(student, teacher, cfg, record["layer_map"])
    assert model.projections is not None and sorted(model.projections) == ["h1", "h2"]
    _, logs = model(*batch)
    ref = _reference(teacher, student, batch, restrict=True, cos_pairs=False, projections=model.projections)
    for k in weights:
        assert float(logs[f"loss_{k}"]) == pytest.approx(float(ref[k].detach()), rel=1e-4), k
    only_cos = DistillationModel(student, teacher, LossConfig(alpha_ce=0, alpha_mlm=0, alpha_cos=1.0), [0, 2])
    assert only_cos.projections is not None and sorted(only_cos.projections) == ["h2"]  # the last layer only
    assert (
        DistillationModel(
            student, teacher, LossConfig(alpha_ce=0, alpha_mlm=0, alpha_cos=0, alpha_att=1.0), [0, 2]
        ).projections
        is None
    )


def test_init_from_channels_exact_weights():
    lin = torch.nn.Linear(3, 5)
    init_from_channels(lin, [4, 0, 2])
    want = torch.zeros(5, 3)
    want[4, 0] = want[0, 1] = want[2, 2] = 1.0
    assert torch.equal(lin.weight, want) and torch.equal(lin.bias, torch.zeros(5))
    assert not lin.weight.requires_grad or lin.weight.grad is None
    nobias = torch.nn.Linear(2, 2, bias=False)
    init_from_channels(nobias, [1, 0])
    assert torch.equal(nobias.weight, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    for bad in ([0, 0, 1], [0, 1], [0, 1, 5], [-1, 0, 1]):
        with pytest.raises(ValueError, match="hidden_channels"):
            init_from_channels(torch.nn.Linear(3, 5), bad)


# ---------------------------------------------------------------------------------------------------------------
# Kill tests for the mutants the first mutmut run left (docs/mutants-distill.md): the wiring around the terms.
# Models built once for the module; a test that changes a model works on a copy.


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def kit(bert_tok):
    """(teacher, student from its layers 0 and 2 perturbed, layer map, random 16-wide student perturbed, batch); the
    MLM head's LayerNorm gain x 8 as in tests/test_wiring.py, so that the temperature matters."""
    teacher = tiny.bert_model(bert_tok, layers=4, hidden=32, heads=4)
    with torch.no_grad():
        teacher.cls.predictions.transform.LayerNorm.weight.mul_(8.0)
    student, record = build_student(teacher, StudentConfig())
    narrow, _ = build_student(teacher, StudentConfig(init="random", hidden_size=16, num_hidden_layers=2))
    return teacher, perturb(student), record["layer_map"], perturb(narrow), masked_batch(bert_tok)


def test_captured_names_who_and_which_pair_lacks_a_projection():
    store = _Captured()
    store["s", 0, 0] = torch.ones(1)
    assert torch.equal(store["s", 0, 0], torch.ones(1))
    for key, want in (
        (("s", 1, 0), "no Q from the student's relation pair 1:"),
        (("t", 2, 2), "no V from the teacher's relation pair 2:"),
        (("x", 3, 1), "no K from the x's relation pair 3:"),  # an unknown side is named as given
    ):
        with pytest.raises(RuntimeError, match=re.escape(want)):
            store[key]


def test_vocab_projection_is_the_last_vocabulary_linear_or_none(kit):
    teacher = kit[0]
    v = teacher.config.vocab_size
    assert vocab_projection(mlm_head(teacher), v) is teacher.cls.predictions.decoder
    seq = torch.nn.Sequential(torch.nn.Linear(4, v), torch.nn.Tanh(), torch.nn.Linear(v, v))
    assert vocab_projection(seq, v) is seq[2]
    assert vocab_projection(torch.nn.Linear(4, 3), v) is None
    assert vocab_projection(torch.tanh, v) is None  # a plain callable (not a module) has no projection
    lin = torch.nn.Linear(4, v)
    assert vocab_projection(types.SimpleNamespace(mods=[torch.tanh, lin]), v) is lin  # _Chain-like .mods


def test_find_qkv_asks_the_models_family():
    """ModernBERT computes Q / K / V in one fused ``Wqkv``: only its family adapter knows (the generic search finds
    no separate projections), and the rotary split needs the model's head count."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    cfg = ModernBertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
    )  # fmt: skip
    model = ModernBertForMaskedLM(cfg)
    src = find_qkv(model, 1)
    assert src.fused is model.model.layers[1].attn.Wqkv and src.rotary
    assert src.num_heads == 4


def test_vocabulary_check_for_each_logit_term(kit):
    teacher, student, layer_map = kit[:3]
    other = copy.deepcopy(student)
    other.resize_token_embeddings(teacher.config.vocab_size + 5)
    for term in ("ce", "mlm"):
        with pytest.raises(ConfigError, match="vocabulary"):
            DistillationModel(other, teacher, loss_cfg(**{term: 1.0}), layer_map)
    DistillationModel(other, teacher, loss_cfg(cos=1.0), layer_map)  # no logit term: no check


def test_layer_pairs_may_name_the_embeddings_output(kit):
    """Hidden state 0 (embeddings output) is a valid pair member on both sides."""
    teacher, student, layer_map, _, batch = kit
    pairs = [[0, 0], [2, 4]]
    model = DistillationModel(student, teacher, loss_cfg(mse=1.0, layer_pairs=pairs), layer_map)
    _, logs = model(*batch)
    ids, am, _ = batch
    with torch.no_grad():
        s_hs = student(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
        t_hs = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
    want = torch.stack([token_mse(s_hs[s], t_hs[t], am) for s, t in pairs]).mean()
    assert float(logs["loss_mse"]) == pytest.approx(float(want), rel=1e-5)


def test_relation_pairs_from_the_hidden_state_pairs(kit):
    """``relation_layers="pairs"``: a pair [s, t] of hidden states gives the layers [s-1, t-1], pairs with an
    embeddings output (0) dropped; the terms average the relation KL over those layers."""
    teacher, student, layer_map, _, batch = kit
    cfg = loss_cfg(att=1.0, val=1.0, relation_layers="pairs", layer_pairs=[[0, 2], [1, 0], [1, 1], [2, 4]])
    model = DistillationModel(student, teacher, cfg, layer_map)
    assert model.relation_pairs == [[0, 0], [1, 3]]
    _, logs = model(*batch)
    ids, am, _ = batch
    with torch.no_grad():
        s_hs = student(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
        t_hs = teacher(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
    att, val = [], []
    with torch.no_grad():  # the students' Linear weights require grad
        for ls, lt in model.relation_pairs:
            (qs, ks, vs), (qt, kt, vt) = qkv(student, s_hs, ls), qkv(teacher, t_hs, lt)
            att.append(relation_kl((qt, kt), (qs, ks), am, 4))
            val.append(relation_kl((vt, vt), (vs, vs), am, 4))
    assert float(logs["loss_att"]) == pytest.approx(float(torch.stack(att).mean()), rel=1e-5)
    assert float(logs["loss_val"]) == pytest.approx(float(torch.stack(val).mean()), rel=1e-5)


def test_value_relation_alone_and_no_relation(kit):
    """``alpha_val`` alone finds the relation layers too (the last ones); without a relation term there are none."""
    teacher, student, layer_map, _, batch = kit
    cfg = loss_cfg(val=1.0)
    model = DistillationModel(student, teacher, cfg, layer_map)
    assert model.relation_pairs == [[1, 3]]
    check_against_reference(model, cfg, batch)
    assert DistillationModel(student, teacher, loss_cfg(cos=1.0), layer_map).relation_pairs == []


def test_relation_heads_error_names_the_model(kit, bert_tok):
    teacher, _, layer_map = kit[:3]
    student24 = tiny.bert_model(bert_tok, layers=2, hidden=24, heads=4)
    for heads, who in ((16, "student width 24"), (3, "teacher width 32")):
        with pytest.raises(ConfigError, match=who):
            DistillationModel(student24, teacher, loss_cfg(att=1.0, relation_heads=heads), layer_map)


@pytest.mark.parametrize(
    "terms,pairs,keys",
    [
        ({"cos": 1.0, "cos_layers": "pairs"}, PAIRS, ["h1", "h2"]),  # every pair's student state, not only the last
        ({"cos": 1.0, "mse": 1.0}, [[1, 2]], ["h1", "h2"]),  # cos: the last state; mse: the pairs'; both kept
        ({"pool": 1.0}, PAIRS, ["h2"]),  # pooled: the last state
    ],
)
def test_projections_for_each_hidden_term(kit, terms, pairs, keys):
    """A 16-wide student: one TinyBERT projection per student hidden state a hidden term reads."""
    teacher, _, _, narrow, batch = kit
    cfg = loss_cfg(**terms, layer_pairs=pairs)
    model = DistillationModel(narrow, teacher, cfg, [0, 2])
    assert model.projections is not None and sorted(model.projections) == keys
    if pairs == PAIRS:  # the reference's pairs
        check_against_reference(model, cfg, batch)
    else:
        _, logs = model(*batch)
        assert math.isfinite(float(logs["loss_cos"])) and math.isfinite(float(logs["loss_mse"]))


@pytest.mark.parametrize("term", ["ce", "mlm"])
def test_one_logit_term_alone(kit, term):
    """KL at T = 2 alone, MLM alone: each is computed without the other."""
    teacher, student, layer_map, _, batch = kit
    cfg = loss_cfg(**{term: 1.0})
    check_against_reference(DistillationModel(student, teacher, cfg, layer_map), cfg, batch)


def test_vocabulary_padding_and_naive_paths(kit):
    """Where the LM heads' vocabulary products run (forward hooks on both decoders): on CPU by default on the
    gathered rows, unpadded (row stride = vocabulary, 367: odd); ``vocab_multiple=64`` pads both to 384 (the
    logits are a view with row stride 384); ``naive`` runs the full models' heads on every position. The terms are
    the same on every path."""
    teacher, student, layer_map, _, batch = kit
    model = DistillationModel(student, teacher, loss_cfg(ce=1.0, mlm=1.0), layer_map)
    assert model.vocab_multiple is None and not model.naive
    seen: dict[str, tuple] = {}
    handles = [
        m.cls.predictions.decoder.register_forward_hook(
            lambda mod, inp, out, who=who: seen.__setitem__(who, (tuple(inp[0].shape), out.stride()))
        )
        for who, m in (("t", teacher), ("s", student))
    ]
    try:
        v, (bsz, length), n = teacher.config.vocab_size, batch[1].shape, int((batch[2] != -100).sum())
        assert v % 2 == 1
        _, base = model(*batch)
        assert seen == {"t": ((n, 32), (v, 1)), "s": ((n, 32), (v, 1))}
        model.set_paths(naive=False, vocab_multiple=64)
        _, padded = model(*batch)
        assert seen == {"t": ((n, 32), (384, 1)), "s": ((n, 32), (384, 1))}
        model.set_paths(naive=True, vocab_multiple=None)
        assert model.naive and model.vocab_multiple is None
        _, naive = model(*batch)
        assert seen["t"][0] == seen["s"][0] == (bsz, length, 32)
    finally:
        for h in handles:
            h.remove()
    for logs in (padded, naive):
        for k in ("loss_ce", "loss_mlm"):
            assert float(logs[k]) == pytest.approx(float(base[k]), rel=1e-5), k


def test_move_teacher_moves_device_and_dtype(kit):
    teacher, student, layer_map = kit[:3]
    moved = copy.deepcopy(teacher)
    model = DistillationModel(student, moved, loss_cfg(cos=1.0), layer_map)
    model.move_teacher("meta", torch.float64)
    assert {(p.device.type, p.dtype) for p in moved.parameters()} == {("meta", torch.float64)}
    assert {(p.device.type, p.dtype) for p in student.parameters()} == {("cpu", torch.float32)}


def test_compile_parts_and_switching(kit, monkeypatch):
    """compile_parts compiles both encoders and the logit losses (dynamic row count); compiled_modules reports them;
    set_compiled switches without recompiling. torch.compile is replaced by a recorder (compiling is slow; the
    compiled calls are not run here)."""
    teacher, student, layer_map = kit[:3]
    teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    calls = []

    def fake_compile(fn=None, **kw):
        calls.append((fn, kw))
        return ("compiled", len(calls))

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = DistillationModel(student, teacher, loss_cfg(ce=1.0), layer_map)
    model.set_compiled(True)  # nothing compiled yet: no-op
    assert model.compiled_modules() == [] and calls == []
    model.compile_parts()
    s_enc, t_enc = student.bert, teacher.bert
    assert (logit_losses, {"dynamic": True}) in calls and len(calls) == 3
    assert model._logit_losses == ("compiled", calls.index((logit_losses, {"dynamic": True})) + 1)
    impls = (s_enc._compiled_call_impl, t_enc._compiled_call_impl)
    assert all(isinstance(i, tuple) and i[0] == "compiled" for i in impls) and impls[0] != impls[1]
    assert model.compiled_modules() == ["student", "teacher"]
    model.set_compiled(False)
    assert model.compiled_modules() == [] and s_enc._compiled_call_impl is None and t_enc._compiled_call_impl is None
    model.set_compiled(True)
    assert model.compiled_modules() == ["student", "teacher"]
    assert (s_enc._compiled_call_impl, t_enc._compiled_call_impl) == impls
    assert len(calls) == 3  # no recompilation
