"""pretrain/distill.py: every loss term of DistillationModel against plain torch written here from the raw teacher
and student outputs, and its gradient (mutation testing, docs/testing.md "Mutation testing").

The references take the models' hidden states (``output_hidden_states``) and recompute the queries, keys and values
of a layer from its input hidden state with the layer's own Linear modules; nothing from pretrain.losses is used."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pretrain.distill import DistillationModel, init_from_channels
from pretrain.losses import LossConfig
from pretrain.masking import Masker, MaskingConfig
from pretrain.student import StudentConfig, build_student
from tests import tiny

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


WEIGHTS = {"ce": 5.0, "mlm": 2.0, "cos": 1.5, "mse": 0.7, "att": 1.1, "val": 0.9, "pool": 3.0}


@pytest.mark.parametrize("restrict,cos_pairs", [(True, False), (False, True)])
def test_every_term_and_its_gradient_against_plain_torch(bert_tok, restrict, cos_pairs):
    """KL at T = 3 on the masked / every real position, MLM, cosine (last layer / layer pairs), MSE over pairs,
    pooled MSE, attention and value relations: each logged term, the total and the student's gradients."""
    teacher, student, record = _models(bert_tok)
    batch = _batch(bert_tok)
    cfg = LossConfig(
        **{f"alpha_{k}": v for k, v in WEIGHTS.items()},
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
    assert sorted(model.projections) == ["h1", "h2"]
    _, logs = model(*batch)
    ref = _reference(teacher, student, batch, restrict=True, cos_pairs=False, projections=model.projections)
    for k in weights:
        assert float(logs[f"loss_{k}"]) == pytest.approx(float(ref[k].detach()), rel=1e-4), k
    only_cos = DistillationModel(student, teacher, LossConfig(alpha_ce=0, alpha_mlm=0, alpha_cos=1.0), [0, 2])
    assert sorted(only_cos.projections) == ["h2"]  # the last layer only
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
