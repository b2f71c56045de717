"""The distillation step as wired, against independent references (issue 23 item 1).

Each loss term that :class:`pretrain.distill.DistillationModel` reports is recomputed here from the RAW outputs of the
teacher and the student (the Hugging Face models called directly with ``output_hidden_states``; queries / keys /
values from the layers' own Linear weights applied to the hidden state entering the layer), with plain torch written
in this file (nothing from :mod:`pretrain.losses`), following the papers:

- DistilBERT (Sanh et al. 2019): ``T^2 x KL(softmax(t/T) || softmax(s/T))`` per row, mean over the rows ("batchmean"),
  the rows being the masked positions (``loss.restrict_ce_to_mask=true``) or every non-pad position (false); MLM
  cross-entropy at T = 1 over the masked positions; ``1 - cos`` of the last hidden states over the non-pad tokens.
- TinyBERT (Jiao et al. 2020, eq. 7): MSE between ``h_s W + b`` (W the learned projection when the widths differ)
  and ``h_t`` over the non-pad tokens and hidden units, mean over the layer pairs (student layer i <-> the teacher's
  hidden state ``layer_map[i]``, the last with the last: (1, 2), (2, 4) for ``layer_map`` [0, 2] of a 4-layer
  teacher).
- MiniLM / MiniLMv2 (Wang et al. 2020 eq. 5-7, 2021): per relation head r (Q / K / V split in R heads of D / R
  columns), ``KL(softmax(Q_t K_t^T / sqrt(d_t)) || softmax(Q_s K_s^T / sqrt(d_s)))`` over the real keys of each real
  query, and the same with ``V V^T``; mean over heads and real queries (and over the layer pairs).
- Reimers & Gurevych 2020: MSE between the mean-pooled (non-pad tokens) last hidden states.
- Task mode: KL at T as above over the examples, cross-entropy on the gold labels, ``1 - cos`` of the softened class
  distributions (the Distillator recipe), and for regression MSE to the teacher's output and to the gold score.

Error budget. The module and the reference see bitwise the same fp32 model outputs (same inputs, same kernels); the
module reduces in fp32, the reference in fp64, so the values differ by fp32 rounding of sums over at most a few
thousand terms (measured below 1e-6 relative): compared at rtol 1e-5. The gradients of the student's parameters flow
back through the same fp32 network from seeds that differ by that rounding: compared at rtol 1e-4 with an absolute
floor of 1e-5 x the largest gradient element (elements that are zero analytically, as a key bias under the
softmax, come out as rounding noise). A wrong temperature, a
sum instead of a mean over pairs, the wrong rows or the wrong layer moves a value by 10% or more.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pretrain.distill import DistillationModel
from pretrain.losses import TERMS, LossConfig
from pretrain.masking import Masker, MaskingConfig
from pretrain.student import StudentConfig, build_student
from tests import tiny
from tests.helpers import assert_close_recorded

T = 2.0  # DistilBERT's temperature; != 1 so that a dropped T or T^2 shows
PAIRS = [(1, 2), (2, 4)]  # [student, teacher] hidden-state indices for layer_map [0, 2] of a 4-layer teacher
VALUE_RTOL = 1e-5
GRAD_RTOL, GRAD_FLOOR = 1e-4, 1e-5  # floor: x the largest gradient element of the model


def loss_cfg(**settings: Any) -> LossConfig:
    """Only the given terms on (``ce=1.0`` -> alpha_ce; every other weight 0), T = 2, other keys as given."""
    kw: dict[str, Any] = {f"alpha_{n}": 0.0 for n in TERMS}
    kw["temperature"] = T
    kw.update({(f"alpha_{k}" if k in TERMS else k): v for k, v in settings.items()})
    return LossConfig(**kw)


def perturb(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def masked_batch(tok, n: int = 6):
    enc = tok(tiny.corpus(1)[:n], padding=True, return_tensors="pt")
    ids, am = enc["input_ids"], enc["attention_mask"]
    masker = Masker.from_tokenizer(MaskingConfig(mlm_mask_prop=0.3), tok, seed=3)
    masked, labels = masker(ids, am, step=0, rank=0, micro_step=0)
    assert (am == 0).any() and (labels != -100).sum() > 5  # padding present, masked rows present
    return masked, am, labels


# ------------------------------------------------------------------------------------------- the references
def kl_rows(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """DistilBERT's soft-target loss on rows [N, C]: T^2 x mean over rows of KL(softmax(t/T) || softmax(s/T))."""
    s, t = s.double() / temp, t.double() / temp
    log_ps = s - torch.logsumexp(s, -1, keepdim=True)
    log_pt = t - torch.logsumexp(t, -1, keepdim=True)
    return (log_pt.exp() * (log_pt - log_ps)).sum() / s.shape[0] * temp**2


def cross_entropy(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    s = s.double()
    return (torch.logsumexp(s, -1) - s[torch.arange(len(y)), y]).mean()


def one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cosine along the last axis, per row."""
    a, b = a.double(), b.double()
    return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def token_mean(per_token: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    """Mean of [B, L] values over the non-pad tokens."""
    return per_token[am.bool()].mean()


def token_mse(hs: torch.Tensor, ht: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    """TinyBERT's MSE over the non-pad tokens and hidden units."""
    return (hs.double() - ht.double())[am.bool()].pow(2).mean()


def mean_pooled(h: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
    return torch.stack([h[b, : int(am[b].sum())].double().mean(0) for b in range(h.shape[0])])


def log_relation(a: torch.Tensor, c: torch.Tensor, heads: int) -> torch.Tensor:
    """log softmax(A_r C_r^T / sqrt(d_r)) per relation head of one sequence's real tokens: a, c [n, D] -> [R, n, n]."""
    n, d = a.shape[0], a.shape[-1] // heads
    a = a.double().reshape(n, heads, d).transpose(0, 1)  # [R, n, d]
    c = c.double().reshape(n, heads, d).transpose(0, 1)
    return torch.log_softmax(a @ c.transpose(1, 2) / math.sqrt(d), dim=-1)


def relation_kl(t_pair, s_pair, am: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLM: KL(teacher relation || student relation) per relation head over each real query's real keys, mean over
    heads and real queries. ``t_pair`` / ``s_pair`` = (A, C) [B, L, D]: relation softmax(A_r C_r^T / sqrt(D / R))."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(am.shape[0]):
        n = int(am[b].sum())  # right padding: the real tokens are the first n
        log_t = log_relation(t_pair[0][b, :n], t_pair[1][b, :n], heads)
        log_s = log_relation(s_pair[0][b, :n], s_pair[1][b, :n], heads)
        total = total + (log_t.exp() * (log_t - log_s)).sum()
        count += heads * n
    return total / count


def qkv(model, hidden_states, layer: int):
    """Query, key, value [B, L, D] of transformer layer ``layer`` (0-based) of a BERT model: its own Linear weights
    applied to the hidden state that enters the layer."""
    att = model.base_model.encoder.layer[layer].attention.self
    h = hidden_states[layer]
    return tuple(F.linear(h, lin.weight, lin.bias) for lin in (att.query, att.key, att.value))


def project(model: DistillationModel, s: int, h: torch.Tensor) -> torch.Tensor:
    """The student's hidden state ``s`` through its TinyBERT projection (the module's parameter) when widths differ."""
    if model.projections is None:
        return h
    lin = model.projections[f"h{s}"]
    assert isinstance(lin, torch.nn.Linear)
    return F.linear(h, lin.weight, lin.bias)


def reference_terms(model: DistillationModel, cfg: LossConfig, batch) -> dict[str, torch.Tensor]:
    """Every active term of ``cfg`` from the raw model outputs (fp64, differentiable w.r.t. the student)."""
    ids, am, labels = batch
    with torch.no_grad():
        t_out = model.teacher(input_ids=ids, attention_mask=am, output_hidden_states=True)
    s_out = model.student(input_ids=ids, attention_mask=am, output_hidden_states=True)
    active, out = cfg.active(), {}
    rows = labels != -100 if cfg.restrict_ce_to_mask else am.bool()
    if "ce" in active:
        out["ce"] = kl_rows(s_out.logits[rows], t_out.logits[rows], cfg.temperature)
    if "mlm" in active:
        sel = labels != -100
        out["mlm"] = cross_entropy(s_out.logits[sel], labels[sel])
    out.update(representation_reference(model, cfg, s_out.hidden_states, t_out.hidden_states, am))
    return out


def representation_reference(model, cfg: LossConfig, s_hs, t_hs, am: torch.Tensor) -> dict[str, torch.Tensor]:
    """The hidden-state and relation terms of ``cfg`` from the hidden-state tuples (index 0 = embeddings output)."""
    n_s, n_t = len(s_hs) - 1, len(t_hs) - 1
    active, out = cfg.active(), {}
    if "cos" in active:
        pairs = [(n_s, n_t)] if cfg.cos_layers == "last" else PAIRS
        out["cos"] = torch.stack(
            [token_mean(one_minus_cos(project(model, s, s_hs[s]), t_hs[t]), am) for s, t in pairs]
        ).mean()
    if "mse" in active:
        out["mse"] = torch.stack([token_mse(project(model, s, s_hs[s]), t_hs[t], am) for s, t in PAIRS]).mean()
    if "pool" in active:
        diff = mean_pooled(project(model, n_s, s_hs[n_s]), am) - mean_pooled(t_hs[n_t], am)
        out["pool"] = diff.pow(2).mean()
    heads = cfg.relation_heads or model.student.config.num_attention_heads
    layers = [(n_s - 1, n_t - 1)] if cfg.relation_layers == "last" else [(s - 1, t - 1) for s, t in PAIRS]
    for term in ("att", "val"):
        if term in active:
            kls = []
            for ls, lt in layers:
                (qs, ks, vs), (qt, kt, vt) = qkv(model.student, s_hs, ls), qkv(model.teacher, t_hs, lt)
                t_pair, s_pair = ((qt, kt), (qs, ks)) if term == "att" else ((vt, vt), (vs, vs))
                kls.append(relation_kl(t_pair, s_pair, am, heads))
            out[term] = torch.stack(kls).mean()
    return out


# ------------------------------------------------------------------------------------------- comparison
def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def grads_of(value: torch.Tensor, params) -> list[torch.Tensor]:
    got = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params, strict=True)]


def assert_grads_close(name: str, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """All parameters' gradients as one vector: rtol GRAD_RTOL, absolute floor GRAD_FLOOR x the largest element (some
    gradients are 0 analytically, as a key bias under the softmax, and come out as rounding noise)."""
    g, w = (torch.cat([t.detach().float().flatten() for t in ts]) for ts in (got, want))
    scale = float(w.abs().max())
    assert scale > 0, name
    assert_close_recorded(f"{name} gradients", g, w, rtol=GRAD_RTOL, atol=GRAD_FLOOR * scale)


def check_against_reference(model, cfg: LossConfig, batch) -> dict[str, float]:
    """The module's reported terms and total, and the gradient of its loss w.r.t. every trainable parameter, against
    :func:`reference_terms`; returns the reference values."""
    loss, logs = model(*batch)
    return assert_matches(model, cfg, loss, logs, reference_terms(model, cfg, batch))


def assert_matches(model, cfg: LossConfig, loss, logs, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """``logs["loss_<term>"]`` == ``ref[term]`` for every active term (each > 1e-3: a term that could not be wrong is
    no test), ``loss`` == sum of alpha x ref, and their gradients w.r.t. the model's trainable parameters agree."""
    active = cfg.active()
    assert set(ref) == set(active)
    assert {k for k in logs if k.startswith("loss_")} == {f"loss_{n}" for n in active}
    values = {n: float(v.detach()) for n, v in ref.items()}
    for name, value in values.items():
        assert value > 1e-3, (name, value)
        assert_close_recorded(f"loss_{name}", float(logs[f"loss_{name}"]), value, rtol=VALUE_RTOL, atol=0)
    ref_total = torch.stack([active[n] * v for n, v in ref.items()]).sum()
    assert_close_recorded("loss", float(loss.detach()), float(ref_total.detach()), rtol=VALUE_RTOL, atol=0)
    params = trainable(model)
    assert_grads_close("loss", grads_of(loss, params), grads_of(ref_total, params))
    return values


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(bert_tok):
    """(teacher, student copied from its layers 0 and 2 then perturbed, its layer map, a random student of width 16
    perturbed, its layer map). The MLM head's LayerNorm gain x 8 (teacher and students): logits of a few units as
    in a trained model, so that the temperature matters (near-uniform distributions make T^2 KL(T) flat in T)."""
    teacher = tiny.bert_model(bert_tok, layers=4, hidden=32, heads=4)
    with torch.no_grad():
        teacher.cls.predictions.transform.LayerNorm.weight.mul_(8.0)
    student, record = build_student(teacher, StudentConfig())
    assert record["layer_map"] == [0, 2]  # PAIRS above
    narrow, nrec = build_student(teacher, StudentConfig(init="random", hidden_size=16, num_hidden_layers=2))
    return teacher, perturb(student), record["layer_map"], perturb(narrow), nrec["layer_map"]


@pytest.fixture(scope="module")
def batch(bert_tok):
    return masked_batch(bert_tok)


# ------------------------------------------------------------------------------------------- pretraining terms
CASES: dict[str, dict[str, Any]] = {
    "kl_masked_T2": {"ce": 1.0},
    "kl_every_position_T2": {"ce": 1.0, "restrict_ce_to_mask": False},
    "mlm": {"mlm": 1.0},
    "cos_last": {"cos": 1.0},
    "cos_pairs": {"cos": 1.0, "cos_layers": "pairs"},
    "mse_pairs": {"mse": 1.0},
    "pool": {"pool": 1.0},
    "attention_relation_last": {"att": 1.0},
    "value_relation_last": {"val": 1.0},
    "relations_pairs_two_heads": {"att": 1.0, "val": 1.0, "relation_layers": "pairs", "relation_heads": 2},
    "all_weighted": {
        "ce": 5.0,
        "mlm": 2.0,
        "cos": 1.5,
        "mse": 3.0,
        "att": 0.5,
        "val": 0.25,
        "pool": 4.0,
        "cos_layers": "pairs",
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_pretraining_term_against_reference(case, models, batch):
    teacher, student, layer_map, _, _ = models
    cfg = loss_cfg(**CASES[case])
    check_against_reference(DistillationModel(student, teacher, cfg, layer_map), cfg, batch)


def test_kl_rows_and_temperature_change_the_value(models, batch):
    """The two KL cases differ (the rows matter) and the temperature is the configured one (T = 1 differs)."""
    teacher, student, layer_map, _, _ = models
    values = {}
    variants: dict[str, dict[str, Any]] = {
        "masked": {},
        "all": {"restrict_ce_to_mask": False},
        "T1": {"temperature": 1.0},
    }
    for key, extra in variants.items():
        cfg = loss_cfg(ce=1.0, **extra)
        values[key] = float(DistillationModel(student, teacher, cfg, layer_map)(*batch)[1]["loss_ce"])
    # 100 x the value tolerance: a module that ignored either setting fails the reference tests above
    assert abs(values["all"] / values["masked"] - 1) > 100 * VALUE_RTOL
    assert abs(values["T1"] / values["masked"] - 1) > 100 * VALUE_RTOL


@pytest.mark.parametrize("case", ["mse_cos_pool_projected", "cos_pairs_projected"])
def test_narrow_student_terms_through_projections(case, models, batch):
    """A narrower random student (16 vs 32): the hidden terms read each student state through its own projection."""
    teacher, _, _, narrow, layer_map = models
    terms = {"mse": 1.0, "cos": 1.0, "pool": 1.0} if case == "mse_cos_pool_projected" else {"cos": 1.0}
    cfg = loss_cfg(**terms, cos_layers="pairs" if case == "cos_pairs_projected" else "last")
    model = DistillationModel(narrow, teacher, cfg, layer_map)
    assert model.projections is not None and len(model.projections) == 2
    check_against_reference(model, cfg, batch)
