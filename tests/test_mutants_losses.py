"""pretrain/losses.py: the tests that kill mutants test_losses.py leaves alive (docs/testing.md "Mutation testing"):
config edges and the key each error names, the model check, empty selections, the relation masking, each term's
normalisation on inputs where a wrong divisor shows."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain import losses as L
from pretrain.schema import ConfigError


def _raises(where: str, **values) -> None:
    with pytest.raises(ConfigError) as err:
        L.LossConfig(**values).validate()
    assert str(err.value).startswith(where), str(err.value)


def test_config_edges():
    L.LossConfig(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, alpha_label=1e-9).validate()  # one tiny weight is enough
    L.LossConfig(layer_pairs=[[0, 0]], relation_heads=1).validate()  # index 0 (embeddings) and one head allowed
    L.LossConfig(cos_layers="pairs", relation_layers="pairs").validate()
    _raises("loss.alpha_mse: inf must be a finite number >= 0", alpha_mse=math.inf)
    _raises("loss.alpha_val: -0.5", alpha_val=-0.5)
    _raises(
        "loss.alpha_ce: every loss weight is 0; set at least one of alpha_ce, alpha_mlm",
        alpha_ce=0,
        alpha_mlm=0,
        alpha_cos=0,
    )
    _raises("loss.temperature: -1.0 must be a finite number > 0", temperature=-1.0)
    _raises("loss.layer_pairs[1]: [1, -2]", layer_pairs=[[0, 1], [1, -2]])
    _raises("loss.layer_pairs[0]: [1.5, 2]", layer_pairs=[[1.5, 2]])
    _raises("loss.layer_pairs[0]: [1]", layer_pairs=[[1]])
    _raises("loss.layer_pairs: is empty", layer_pairs=[])
    _raises("loss.cos_layers: 'every' is not 'last' or 'pairs'", cos_layers="every")
    _raises("loss.relation_layers: 'first' is not 'last' or 'pairs'", relation_layers="first")
    _raises("loss.relation_heads: -2 must be a positive integer", relation_heads=-2)


def test_active_terms_in_order():
    cfg = L.LossConfig(alpha_ce=0, alpha_mlm=0.5, alpha_cos=0, alpha_val=2.0, alpha_prob_cos=1.0)
    assert list(cfg.active().items()) == [("mlm", 0.5), ("val", 2.0), ("prob_cos", 1.0)]


@pytest.mark.parametrize("teacher,student,who", [(False, True, "the teacher bert-x"), (True, False, "the student")])
def test_check_models_names_who_lacks_the_head(teacher, student, who):
    with pytest.raises(ConfigError) as err:
        L.LossConfig(alpha_ce=0, alpha_mlm=2.0).check_models(
            teacher_has_mlm_head=teacher, student_has_mlm_head=student, teacher_name="bert-x"
        )
    assert str(err.value).startswith(f"loss.alpha_mlm: 2.0 needs an MLM head but {who} has none")
    L.LossConfig().check_models(teacher_has_mlm_head=True, student_has_mlm_head=True)


def test_combine_losses_without_active_term_and_with_one():
    cfg = L.LossConfig(alpha_ce=0, alpha_mlm=0, alpha_cos=0)
    with pytest.raises(ValueError, match="no active loss term"):
        L.combine_losses(cfg, {"ce": torch.tensor(1.0)})
    total, logs = L.combine_losses(L.LossConfig(alpha_ce=0, alpha_mlm=0, alpha_cos=3.0), {"cos": torch.tensor(0.5)})
    assert float(total) == 1.5 and float(logs["loss"]) == 1.5 and float(logs["loss_cos"]) == 0.5
    assert list(logs) == ["loss", "loss_cos"]


def test_label_loss_and_prob_cosine_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    ce = -(torch.log_softmax(logits.double(), -1)[[0, 1], [0, 2]]).mean()
    assert float(L.label_loss(logits, labels, regression=False)) == pytest.approx(float(ce), rel=1e-6)
    reg = torch.tensor([[1.0], [3.0]])
    assert float(L.label_loss(reg, torch.tensor([0.0, 1.0]), regression=True)) == pytest.approx((1 + 4) / 2)
    other = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, -2.0]])
    for temp in (1.0, 4.0):
        ps, pt = torch.softmax(logits.double() / temp, -1), torch.softmax(other.double() / temp, -1)
        want = (1 - (ps * pt).sum(-1) / (ps.norm(dim=-1) * pt.norm(dim=-1))).mean()
        assert float(L.prob_cosine(logits, other, temp)) == pytest.approx(float(want), rel=1e-5)


def test_empty_selections_give_zero_not_nan():
    s = torch.randn(4, 6)
    assert float(L.mlm_ce(s, torch.full((4,), -100))) == 0.0
    h = torch.randn(2, 3, 5)
    none = torch.zeros(2, 3, dtype=torch.long)
    assert float(L.hidden_cosine(h, h + 1, none)) == 0.0
    assert float(L.hidden_mse(h, h + 1, none)) == 0.0
    assert torch.equal(L.mean_pool(h, none), torch.zeros(2, 5))


def test_normalisations_by_hand():
    """Inputs where each divisor shows: MLM over 3 masked rows of 5; MSE over real tokens x H; pooled means over each
    sequence's own real tokens; cosine over real tokens only."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g)
    labels = torch.tensor([1, -100, 3, -100, 6])
    want = -torch.log_softmax(s.double(), -1)[[0, 2, 4], [1, 3, 6]].mean()
    assert float(L.mlm_ce(s, labels)) == pytest.approx(float(want), rel=1e-6)
    hs, ht = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    am = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    real = am.bool()
    assert float(L.hidden_mse(hs, ht, am)) == pytest.approx(float(((hs - ht) ** 2)[real].mean()), rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(hs, ht, dim=-1)
    assert float(L.hidden_cosine(hs, ht, am)) == pytest.approx(float((1 - cos)[real].mean()), rel=1e-6)
    pooled = torch.stack([hs[0, :3].mean(0), hs[1, :1].mean(0)])
    torch.testing.assert_close(L.mean_pool(hs, am), pooled)
    pooled_t = torch.stack([ht[0, :3].mean(0), ht[1, :1].mean(0)])
    assert float(L.pooled_mse(hs, ht, am)) == pytest.approx(float(((pooled - pooled_t) ** 2).mean()), rel=1e-6)


def test_relation_log_probs_by_hand():
    """Two heads of width 2; the pad key gets probability exactly 0 (log -> very negative, finite)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 3, 4, generator=g), torch.randn(1, 3, 4, generator=g)
    am = torch.tensor([[1, 1, 0]])
    got = L.relation_log_probs(a, b, am, 2)
    assert got.shape == (1, 2, 3, 3) and got.dtype == torch.float32
    for h in range(2):
        ah, bh = a[0, :, 2 * h : 2 * h + 2].double(), b[0, :, 2 * h : 2 * h + 2].double()
        scores = ah @ bh.T / math.sqrt(2)
        want = torch.log_softmax(scores[:, :2], -1)
        torch.testing.assert_close(got[0, h, :, :2].double(), want, rtol=1e-5, atol=1e-6)
        assert torch.all(got[0, h, :, 2].exp() == 0) and torch.all(torch.isfinite(got[0, h, :, 2]))
    # relation KL: mean over heads and real queries only (a pad query with a large KL does not count)
    log_pt = torch.log_softmax(torch.randn(1, 2, 3, 3, generator=g), -1)
    log_ps = torch.log_softmax(torch.randn(1, 2, 3, 3, generator=g), -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    assert float(L._relation_kl(log_pt, log_ps, am)) == pytest.approx(float(kl[:, :, :2].mean()), rel=1e-6)


@pytest.mark.parametrize(
    ("bad", "shown"),
    [
        ((), "an empty tuple"),
        (torch.zeros(2, 3), "torch.Size([2, 3])"),
        (torch.zeros(0, 3, 4), "torch.Size([0, 3, 4])"),
        ([1.0], "'list'"),
    ],
    ids=["sdpa-empty-tuple", "two-dims", "no-elements", "not-a-tensor"],
)
def test_relation_inputs_missing_or_empty_are_named(bad, shown):
    """No attention inputs (SDPA's empty tuple, a wrong rank, an empty tensor, not a tensor) in either argument: a
    ValueError that shows what arrived, never a shape error further down or a silent value."""
    good, mask = torch.zeros(1, 2, 4), torch.ones(1, 2)
    for a, b in ((bad, good), (good, bad)):
        with pytest.raises(ValueError) as err:
            L.relation_log_probs(a, b, mask, 2)
        assert f"({shown}, expected [B, L, D] projections)" in str(err.value)
    assert L.relation_log_probs(torch.ones(1, 1, 1), torch.ones(1, 1, 1), torch.ones(1, 1), 1).item() == 0.0


def test_kd_kl_on_three_dims_one_row_and_small_weights():
    """[B, L, V] logits without a mask == the flattened rows; one selected row is divided by 1; T < 1 and a weight
    below 1 are valid (the config range is (0, inf) and > 0)."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    assert float(L.kd_kl(s, t, 2.0)) == pytest.approx(float(L.kd_kl(s.reshape(6, 5), t.reshape(6, 5), 2.0)), rel=1e-6)
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[1, 2] = True
    pt = torch.softmax(t[1, 2].double() / 0.5, -1)
    want = (pt * (torch.log(pt) - torch.log_softmax(s[1, 2].double() / 0.5, -1))).sum() * 0.25
    assert float(L.kd_kl(s, t, 0.5, mask=one)) == pytest.approx(float(want), rel=1e-5)
    L.LossConfig(temperature=0.5).validate()
    with pytest.raises(ConfigError, match=r"loss\.alpha_ce: 0\.5 needs an MLM head"):
        L.LossConfig(alpha_ce=0.5).check_models(teacher_has_mlm_head=False, student_has_mlm_head=True)


def test_single_elements_are_divided_by_one():
    """One masked token, one real token, one hidden unit, one relation query and head: each mean is over 1."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 6, generator=g)
    labels = torch.tensor([-100, 4, -100])
    assert float(L.mlm_ce(s, labels)) == pytest.approx(float(-torch.log_softmax(s[1].double(), -1)[4]), rel=1e-6)
    hs, ht = torch.randn(1, 2, 1, generator=g), torch.randn(1, 2, 1, generator=g)
    am = torch.tensor([[1, 0]])
    assert float(L.hidden_mse(hs, ht, am)) == pytest.approx(float((hs[0, 0, 0] - ht[0, 0, 0]) ** 2), rel=1e-6)
    hs3, ht3 = torch.randn(1, 2, 3, generator=g), torch.randn(1, 2, 3, generator=g)
    cos = torch.nn.functional.cosine_similarity(hs3[0, 0], ht3[0, 0], dim=0)
    assert float(L.hidden_cosine(hs3, ht3, am)) == pytest.approx(float(1 - cos), rel=1e-5)
    log_pt = torch.log_softmax(torch.randn(1, 1, 2, 2, generator=g), -1)
    log_ps = torch.log_softmax(torch.randn(1, 1, 2, 2, generator=g), -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    assert float(L._relation_kl(log_pt, log_ps, am)) == pytest.approx(float(kl[0, 0, 0]), rel=1e-6)
