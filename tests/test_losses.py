"""Each loss against an independent reference (torch.nn losses or a hand loop); zero for identical inputs; T^2; pads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain import losses as L
from pretrain.schema import ConfigError, from_dict


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)  # every test sees the same data whatever the order or selection


def close(a, b, tol=1e-5):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * 1e-2))


@pytest.fixture
def mask():
    """[3, 7] attention mask with right padding of different lengths."""
    return torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])


def test_kd_kl_matches_kldivloss():
    s, t = torch.randn(50, 97) * 3, torch.randn(50, 97) * 3
    for temp in (1.0, 2.0, 4.0):
        ref = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / temp, -1), F.softmax(t / temp, -1)) * temp**2
        assert close(L.kd_kl(s, t, temp), ref)
    sel = torch.rand(50) < 0.3
    ref = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s[sel] / 2, -1), F.softmax(t[sel] / 2, -1)) * 4
    assert close(L.kd_kl(s, t, 2.0, mask=sel), ref)
    assert float(L.kd_kl(s, s.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.kd_kl(s, t, 2.0, mask=torch.zeros(50, dtype=torch.bool))) == 0.0


def test_kd_kl_temperature_scaling():
    """With the T^2 factor the loss tends to a T-independent limit, (1/2V) sum (d - mean d)^2, d = t - s
    (Hinton 2015)."""
    s, t = torch.randn(20, 64, dtype=torch.float64) * 3, torch.randn(20, 64, dtype=torch.float64) * 3
    d = t - s
    limit = ((d - d.mean(-1, keepdim=True)) ** 2).sum(-1).mean() / (2 * 64)
    for temp in (100.0, 200.0):
        assert float(L.kd_kl(s, t, temp)) == pytest.approx(float(limit), rel=0.01)
    assert float(L.kd_kl(s, t, 1.0)) < 0.85 * float(limit)  # at T = 1 the value is far from the limit (~0.7x)


def test_kd_kl_half_inputs_compute_in_fp32():
    s, t = (torch.randn(30, 200) * 4).half(), (torch.randn(30, 200) * 4).bfloat16()
    out = L.kd_kl(s, t, 2.0)
    assert out.dtype == torch.float32
    assert close(out, L.kd_kl(s.float(), t.float(), 2.0))


def test_mlm_ce(mask):
    logits = torch.randn(3, 7, 11)
    labels = torch.full((3, 7), -100)
    labels[0, 1], labels[1, 3], labels[2, 0] = 4, 9, 2
    ref = sum(F.cross_entropy(logits[i, j][None], labels[i, j][None]) for i, j in [(0, 1), (1, 3), (2, 0)]) / 3
    assert close(L.mlm_ce(logits, labels), ref)
    assert close(L.mlm_ce(logits[labels != -100], labels[labels != -100]), ref)  # gathered rows
    assert float(L.mlm_ce(logits, torch.full((3, 7), -100))) == 0.0


def test_hidden_cosine(mask):
    s, t = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    m = mask.bool()
    ref = nn.CosineEmbeddingLoss()(s[m], t[m], torch.ones(int(m.sum())))
    assert close(L.hidden_cosine(s, t, mask), ref)
    s2 = s.clone()
    s2[~m] = torch.randn(int((~m).sum()), 16) * 100  # pads ignored
    assert close(L.hidden_cosine(s2, t, mask), ref)
    assert float(L.hidden_cosine(t * 3.0, t, mask)) == pytest.approx(0.0, abs=1e-6)


def test_hidden_mse(mask):
    s, t = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    m = mask.bool()
    ref = nn.MSELoss()(s[m], t[m])
    assert close(L.hidden_mse(s, t, mask), ref)
    s2 = s.clone()
    s2[~m] += 50.0
    assert close(L.hidden_mse(s2, t, mask), ref)
    assert float(L.hidden_mse(t, t, mask)) == 0.0


def test_pooled_mse(mask):
    s, t = torch.randn(3, 7, 8), torch.randn(3, 7, 8)
    lengths = mask.sum(1)
    ps = torch.stack([s[i, :n].mean(0) for i, n in enumerate(lengths)])
    pt = torch.stack([t[i, :n].mean(0) for i, n in enumerate(lengths)])
    ref = nn.MSELoss()(ps, pt)
    assert close(L.pooled_mse(s, t, mask), ref)
    s2 = s.clone()
    s2[~mask.bool()] = 1e3
    assert close(L.pooled_mse(s2, t, mask), ref)
    assert float(L.pooled_mse(t, t, mask)) == 0.0


def _head_probs(a, b, i: int, n: int, h: int, heads: int):
    """softmax(a_h b_h^T / sqrt(d)) of sequence ``i`` (its first ``n`` positions) and relation head ``h``."""
    d = a.shape[-1] // heads
    a_h, b_h = a[i, :n, h * d : (h + 1) * d].double(), b[i, :n, h * d : (h + 1) * d].double()
    return F.softmax(a_h @ b_h.T / d**0.5, dim=-1)


def _hand_relation_kl(sa, sb, ta, tb, mask, heads):
    """Loop over sequences (cut to their real length) and heads; KLDivLoss(sum) per query row, mean over rows."""
    total, rows = 0.0, 0
    for i, n in enumerate(mask.sum(1).tolist()):
        for h in range(heads):
            p_t, p_s = _head_probs(ta, tb, i, n, h, heads), _head_probs(sa, sb, i, n, h, heads)
            total += float(nn.KLDivLoss(reduction="sum")(p_s.log(), p_t))
            rows += n
    return total / rows


def test_attention_and_value_relation_kl(mask):
    """Different widths (student 16, teacher 32) with 4 relation heads; pads excluded as keys and as queries."""
    sq, sk, sv = (torch.randn(3, 7, 16) for _ in range(3))
    tq, tk, tv = (torch.randn(3, 7, 32) for _ in range(3))
    att = L.attention_kl(sq, sk, tq, tk, mask, 4)
    assert close(att, _hand_relation_kl(sq, sk, tq, tk, mask, 4))
    val = L.value_relation_kl(sv, tv, mask, 4)
    assert close(val, _hand_relation_kl(sv, sv, tv, tv, mask, 4))
    assert float(L.attention_kl(tq, tk, tq, tk, mask, 4)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.value_relation_kl(tv, tv, mask, 8)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="relation_heads"):
        L.attention_kl(sq, sk, tq, tk, mask, 5)


def test_combine_losses():
    cfg = L.LossConfig(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, alpha_pool=3.0)
    parts = {
        "ce": torch.tensor(0.5, requires_grad=True),
        "mlm": torch.tensor(2.0),
        "cos": torch.tensor(0.25),
        "pool": torch.tensor(0.1),
        "mse": torch.tensor(100.0),
    }  # mse inactive: ignored
    total, logs = L.combine_losses(cfg, parts)
    assert float(total.detach()) == pytest.approx(5 * 0.5 + 2 * 2.0 + 0.25 + 3 * 0.1)
    assert set(logs) == {"loss", "loss_ce", "loss_mlm", "loss_cos", "loss_pool"}
    assert all(not v.requires_grad for v in logs.values()) and total.requires_grad
    with pytest.raises(KeyError, match="pool"):
        L.combine_losses(cfg, {k: v for k, v in parts.items() if k != "pool"})


def test_loss_config_validation():
    cfg = from_dict(L.LossConfig, {}, "loss")
    assert cfg.active() == {"ce": 5.0, "mlm": 2.0, "cos": 1.0} and cfg.temperature == 2.0
    bad = [
        ({"alpha_ce": -1.0}, "loss.alpha_ce"),
        ({"alpha_ce": 0, "alpha_mlm": 0, "alpha_cos": 0}, "every loss weight is 0"),
        ({"temperature": 0}, "loss.temperature"),
        ({"temperature": float("inf")}, r"loss.temperature: inf must be a finite number > 0"),
        ({"temperature": float("nan")}, r"loss.temperature: nan"),
        ({"layer_pairs": [[1, 2, 3]]}, r"loss.layer_pairs\[0\]"),
        ({"cos_layers": "all"}, "loss.cos_layers"),
        ({"relation_heads": 0}, "loss.relation_heads"),
    ]
    for raw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            from_dict(L.LossConfig, raw, "loss")
    with pytest.raises(ConfigError, match=r"loss\.alpha_ce.*BertModel"):
        cfg.check_models(teacher_has_mlm_head=False, student_has_mlm_head=False, teacher_name="BertModel")
    L.LossConfig(alpha_ce=0, alpha_mlm=0, alpha_pool=1).check_models(
        teacher_has_mlm_head=False, student_has_mlm_head=False
    )


def test_components_trust_their_validated_sections(monkeypatch):
    """Sections are validated once, when the run config is loaded (schema.from_dict): build_student and
    DistillationModel do not validate again. The model-dependent check (LossConfig.check_models: an MLM head for the
    logit terms) runs once, at the trainer's preflight."""
    from pretrain.distill import DistillationModel
    from pretrain.student import StudentConfig, build_student
    from tests import tiny

    for cls in (L.LossConfig, StudentConfig):
        monkeypatch.setattr(cls, "validate", lambda self, _c=cls: pytest.fail(f"{_c.__name__} validated again"))
    teacher = tiny.bert_model(layers=2)
    student, record = build_student(teacher, StudentConfig())
    model = DistillationModel(student, teacher, L.LossConfig(), record["layer_map"])
    assert model.loss_cfg.active() == {"ce": 5.0, "mlm": 2.0, "cos": 1.0} and record["layer_map"] == [0]


def test_restrict_ce_to_mask_help_says_what_the_reference_runs():
    """The Hugging Face reference command leaves --restrict_ce_to_mask off (KL on every non-pad token); the help text
    must not attribute the project's default (true) to DistilBERT, and must give the reason for it."""
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(L.LossConfig)}
    text = helps["restrict_ce_to_mask"]
    assert L.LossConfig().restrict_ce_to_mask is True
    assert "(DistilBERT)" not in text and "--restrict_ce_to_mask" in text and "every non-pad position" in text
    assert "README command does not pass it" in text and "FLOPs" in text
    assert "train.py's own default is 0.5" in helps["alpha_ce"]  # 5.0 is the README command's, not train.py's
