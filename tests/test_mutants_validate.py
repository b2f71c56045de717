"""pretrain/validate.py against hand computations (mutation testing, docs/testing.md "Mutation testing"): the MLM sums
and their means, the representation sums, when evaluation is due, and one Validator pass of tiny models.

Every reference here is plain numpy in float64 written in the test, not the module's functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pretrain.validate import (
    MAX_LOG_PERPLEXITY,
    Validator,
    evaluation_due,
    mlm_summary,
    mlm_sums,
    representation_sums,
)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _logits(seed: int, n: int = 7, v: int = 11) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_mlm_sums_against_numpy():
    """(n, NLL, correct, KL(teacher || model), agreement) with KL in the teacher -> model direction."""
    s, t = _logits(1), _logits(2)
    targets = torch.tensor([0, 3, 5, 10, 2, 2, 7])
    targets[:3] = s.argmax(-1)[:3]  # some correct predictions, so correct is neither 0 nor n
    t[:4] = s[:4] + 0.01  # some agreements with the teacher, but not all
    got = mlm_sums(s, targets, t)
    assert got.dtype == torch.float64 and got.shape == (5,)
    ls, lt = _log_softmax(s.double().numpy()), _log_softmax(t.double().numpy())
    tg = targets.numpy()
    nll = -ls[np.arange(len(tg)), tg].sum()
    correct = (ls.argmax(-1) == tg).sum()
    kl = (np.exp(lt) * (lt - ls)).sum()
    kl_reverse = (np.exp(ls) * (ls - lt)).sum()
    agree = (ls.argmax(-1) == lt.argmax(-1)).sum()
    assert 0 < correct < len(tg) and 0 < agree < len(tg)
    assert abs(kl - kl_reverse) > 0.1  # the direction matters for these logits
    np.testing.assert_allclose(got.numpy(), [len(tg), nll, correct, kl, agree], rtol=1e-5)


def test_mlm_sums_without_teacher():
    """No teacher (the teacher evaluated itself): KL 0 and every position agrees."""
    s = _logits(3)
    targets = torch.arange(7) % 11
    got = mlm_sums(s, targets, None)
    assert float(got[3]) == 0.0
    assert float(got[4]) == 7.0
    assert float(got[0]) == 7.0


def test_mlm_summary_means_and_cap():
    got = mlm_summary([4.0, 6.0, 3.0, 2.0, 1.0])
    assert got == {
        "mlm_loss": 1.5,
        "perplexity": pytest.approx(math.exp(1.5)),
        "mlm_accuracy": 0.75,
        "kl_to_teacher": 0.5,
        "agreement": 0.25,
        "masked_tokens": 4,
    }
    assert isinstance(got["masked_tokens"], int)
    assert mlm_summary([0.0, 0.0, 0.0, 0.0, 0.0]) is None
    capped = mlm_summary([2.0, 2 * (MAX_LOG_PERPLEXITY + 10), 0.0, 0.0, 0.0])
    assert capped["perplexity"] == pytest.approx(math.exp(MAX_LOG_PERPLEXITY))
    assert capped["mlm_loss"] == MAX_LOG_PERPLEXITY + 10
    # just below the cap the perplexity is not capped
    below = mlm_summary([1.0, MAX_LOG_PERPLEXITY - 1, 0.0, 0.0, 0.0])
    assert below["perplexity"] == pytest.approx(math.exp(MAX_LOG_PERPLEXITY - 1))


def test_representation_sums_against_numpy():
    g = torch.Generator().manual_seed(4)
    hs, ht = torch.randn(3, 5, 6, generator=g), torch.randn(3, 5, 6, generator=g)
    am = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    got = representation_sums(hs, ht, am)
    assert got.dtype == torch.float64
    got = got.numpy()
    s, t, m = hs.double().numpy(), ht.double().numpy(), am.numpy().astype(bool)

    def cos(a, b):
        return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    pooled_s = np.stack([s[i][m[i]].mean(0) for i in range(3)])
    pooled_t = np.stack([t[i][m[i]].mean(0) for i in range(3)])
    want = [m.sum(), cos(s, t)[m].sum(), 3, cos(pooled_s, pooled_t).sum()]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_evaluation_due():
    assert [s for s in range(1, 13) if evaluation_due(s, 5, 12)] == [5, 10, 12]
    assert [s for s in range(1, 13) if evaluation_due(s, 0, 7)] == [7]
    assert evaluation_due(3, 1, 100) is True
    assert evaluation_due(4, 3, 100) is False


class _Head(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, h):
        return h @ self.w


class _Model(torch.nn.Module):
    """A stand-in for a Hugging Face MLM: ``base_model`` maps ids to hidden states with an embedding table,
    ``get_output_embeddings`` is unused (the Validator takes the heads it is given through mlm_head)."""

    def __init__(self, emb: torch.Tensor, width: int):
        super().__init__()
        self.emb = emb
        self.config = type("C", (), {"hidden_size": width})()

    def __call__(self, input_ids, attention_mask):
        assert attention_mask is not None and attention_mask.shape == input_ids.shape  # the batch's mask, not None
        return type("O", (), {"last_hidden_state": self.emb[input_ids]})()


def test_validator_run_against_numpy(monkeypatch):
    """One Validator pass over two batches: masks from the masker at step 0, micro-step = batch index, this rank;
    the record's means equal numpy's over the masked positions, all-reduce applied once to the concatenated sums."""
    import pretrain.student as student_module

    g = torch.Generator().manual_seed(5)
    v, h = 9, 4
    emb_s, emb_t = torch.randn(v, h, generator=g), torch.randn(v, h, generator=g)
    w_s, w_t = torch.randn(h, v, generator=g), torch.randn(h, v, generator=g)
    student, teacher = _Model(emb_s, h), _Model(emb_t, h)
    heads = {id(student): _Head(w_s), id(teacher): _Head(w_t)}
    monkeypatch.setattr(student_module, "mlm_head", lambda m: heads[id(m)])
    monkeypatch.setattr(student_module, "base_model", lambda m: m)
    model = type("D", (), {"student": student, "teacher": teacher})()
    batches = [
        {
            "input_ids": torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        },
        {"input_ids": torch.tensor([[8, 3, 2, 1]]), "attention_mask": torch.tensor([[1, 1, 1, 1]])},
    ]
    calls = []

    def masker(ids, mask, *, step, rank, micro_step):
        assert torch.equal(mask, batches[micro_step]["attention_mask"])
        calls.append((step, rank, micro_step))
        labels = torch.full_like(ids, -100)
        labels[:, 1 + micro_step] = ids[:, 1 + micro_step]
        masked = ids.clone()
        masked[:, 1 + micro_step] = 0
        return masked, labels

    reduced = []

    def all_reduce(t):
        reduced.append(t.clone())
        t.mul_(2)  # a second rank with the same sums

    val = Validator(model, lambda: batches, masker, device=torch.device("cpu"), all_reduce=all_reduce, rank=3)
    rec = val.run(17)
    assert calls == [(0, 3, 0), (0, 3, 1)]
    assert len(reduced) == 1 and reduced[0].shape == (9,) and reduced[0].dtype == torch.float64
    nll = correct = kl = agree = n = 0.0
    cos_sum = pooled = 0.0
    for i, b in enumerate(batches):
        ids, am = b["input_ids"].numpy(), b["attention_mask"].numpy().astype(bool)
        masked = ids.copy()
        masked[:, 1 + i] = 0
        hs, ht = emb_s.double().numpy()[masked], emb_t.double().numpy()[masked]
        ls = _log_softmax(hs[:, 1 + i] @ w_s.double().numpy())
        lt = _log_softmax(ht[:, 1 + i] @ w_t.double().numpy())
        tg = ids[:, 1 + i]
        n += len(tg)
        nll -= ls[np.arange(len(tg)), tg].sum()
        correct += (ls.argmax(-1) == tg).sum()
        kl += (np.exp(lt) * (lt - ls)).sum()
        agree += (ls.argmax(-1) == lt.argmax(-1)).sum()
        c = (hs * ht).sum(-1) / (np.linalg.norm(hs, axis=-1) * np.linalg.norm(ht, axis=-1))
        cos_sum += c[am].sum()
        ps = np.stack([hs[j][am[j]].mean(0) for j in range(len(ids))])
        pt = np.stack([ht[j][am[j]].mean(0) for j in range(len(ids))])
        pooled += ((ps * pt).sum(-1) / (np.linalg.norm(ps, axis=-1) * np.linalg.norm(pt, axis=-1))).sum()
    # the sums are accumulated in float64: the record equals the float64 sum of the batches' mlm_sums exactly
    total = torch.zeros(5, dtype=torch.float64)
    for i, b in enumerate(batches):
        masked = b["input_ids"].clone()
        masked[:, 1 + i] = 0
        pos = torch.zeros_like(masked, dtype=torch.bool)
        pos[:, 1 + i] = True
        total += mlm_sums(emb_s[masked][pos] @ w_s, b["input_ids"][pos], emb_t[masked][pos] @ w_t)
    assert rec["mlm_loss"] == float(2 * total[1]) / float(2 * total[0])
    tokens = 4 + 3 + 4
    assert rec["split"] == "valid" and rec["step"] == 17
    assert rec["sequences"] == 2 * 3 and rec["tokens"] == 2 * tokens and rec["masked_tokens"] == 2 * n
    assert rec["mlm_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert rec["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert rec["mlm_accuracy"] == pytest.approx(correct / n)
    assert rec["kl_to_teacher"] == pytest.approx(kl / n, rel=1e-5)
    assert rec["agreement"] == pytest.approx(agree / n)
    assert rec["hidden_cosine"] == pytest.approx(cos_sum / tokens, rel=1e-5)
    assert rec["pooled_cosine"] == pytest.approx(pooled / 3, rel=1e-5)


def test_validator_different_widths_counts_without_cosines(monkeypatch):
    """Student and teacher of different widths: tokens and sequences are still counted, no cosine is reported."""
    import pretrain.student as student_module

    g = torch.Generator().manual_seed(6)
    student, teacher = _Model(torch.randn(9, 4, generator=g), 4), _Model(torch.randn(9, 6, generator=g), 6)
    monkeypatch.setattr(student_module, "mlm_head", lambda m: None)
    monkeypatch.setattr(student_module, "base_model", lambda m: m)
    model = type("D", (), {"student": student, "teacher": teacher})()
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}

    def masker(ids, mask, **_kw):
        return ids, torch.full_like(ids, -100)

    val = Validator(
        model, lambda: [batch, batch], masker, device=torch.device("cpu"), all_reduce=lambda t: None, rank=0
    )
    rec = val.run(1)
    assert rec == {"split": "valid", "step": 1, "sequences": 4, "tokens": 10}


def _stub(monkeypatch, heads):
    import pretrain.student as student_module

    g = torch.Generator().manual_seed(7)
    student, teacher = _Model(torch.randn(9, 4, generator=g), 4), _Model(torch.randn(9, 4, generator=g), 4)
    by_model = {id(student): heads[0], id(teacher): heads[1]}
    monkeypatch.setattr(student_module, "mlm_head", lambda m: by_model[id(m)])
    monkeypatch.setattr(student_module, "base_model", lambda m: m)
    return type("D", (), {"student": student, "teacher": teacher})()


def _mask_second(ids, mask, **_kw):
    labels = torch.full_like(ids, -100)
    labels[:, 1:2] = ids[:, 1:2]
    return ids, labels


def test_validator_one_head_missing_gives_no_mlm_metrics(monkeypatch):
    """A student with an MLM head and a teacher without (a sentence encoder): no MLM metrics, cosines still."""
    model = _stub(monkeypatch, (_Head(torch.randn(4, 9)), None))
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    rec = Validator(model, lambda: [batch], _mask_second, device=torch.device("cpu"), all_reduce=lambda t: None, rank=0)
    got = rec.run(2)
    assert "mlm_loss" not in got and got["tokens"] == 3 and "hidden_cosine" in got


def test_validator_without_tokens_and_with_one(monkeypatch):
    """No batch at all (a rank without valid sequences): counts 0 and no cosine; one real token: its cosine."""
    model = _stub(monkeypatch, (None, None))
    empty = Validator(model, list, _mask_second, device=torch.device("cpu"), all_reduce=lambda t: None, rank=0)
    assert empty.run(4) == {"split": "valid", "step": 4, "sequences": 0, "tokens": 0}
    batch = {"input_ids": torch.tensor([[5, 0]]), "attention_mask": torch.tensor([[1, 0]])}
    one = Validator(model, lambda: [batch], _mask_second, device=torch.device("cpu"), all_reduce=lambda t: None, rank=0)
    rec = one.run(5)
    hs, ht = model.student.emb[5].double(), model.teacher.emb[5].double()
    cos = float((hs @ ht) / (hs.norm() * ht.norm()))
    assert rec["tokens"] == 1 and rec["hidden_cosine"] == pytest.approx(cos, rel=1e-5)
    assert rec["pooled_cosine"] == pytest.approx(cos, rel=1e-5)
