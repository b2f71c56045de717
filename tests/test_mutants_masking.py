"""pretrain/masking.py: the tests that kill mutants test_masking.py leaves alive (docs/testing.md "Mutation
testing"): the edges of every config range, exactly as documented."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from pretrain.masking import Masker, MaskingConfig
from pretrain.schema import ConfigError


@pytest.mark.parametrize(
    "values",
    [
        {"mlm_mask_prop": 1.0},  # (0, 1]: 1 included
        {"word_mask": 1.0, "word_keep": 0.0, "word_rand": 0.0},  # [0, 1] each: both ends included
        {"word_mask": 0.0, "word_keep": 1.0, "word_rand": 0.0},
        {"word_mask": 0.0, "word_keep": 0.0, "word_rand": 1.0},
        {"mlm_smoothing": 0.0},  # >= 0: uniform included
    ],
)
def test_range_edges_are_accepted(values):
    MaskingConfig(**values).validate()


@pytest.mark.parametrize(
    "values,where",
    [
        ({"mlm_mask_prop": 1.5}, "masking.mlm_mask_prop: 1.5 must be in (0, 1]"),
        ({"word_mask": 1.5, "word_keep": -0.25, "word_rand": -0.25}, "masking.word_mask: 1.5 must be in [0, 1]"),
        ({"word_mask": 0.2, "word_keep": 1.5, "word_rand": -0.7}, "masking.word_keep: 1.5 must be in [0, 1]"),
        ({"word_mask": 0.0, "word_keep": -0.5, "word_rand": 1.5}, "masking.word_keep: -0.5 must be in [0, 1]"),
        ({"word_mask": 0.0, "word_keep": 0.0, "word_rand": 1.5}, "masking.word_rand: 1.5 must be in [0, 1]"),
        (
            {"word_mask": 0.5, "word_keep": 0.5, "word_rand": 0.1},
            "masking.word_mask: word_mask + word_keep + word_rand",
        ),
    ],
)
def test_out_of_range_is_refused_naming_the_key(values, where):
    with pytest.raises(ConfigError) as err:
        MaskingConfig(**values).validate()
    assert str(err.value).startswith(where)


V, PAD, CLS, SEP, MASK = 60, 0, 2, 3, 4
SPECIALS = [0, 1, 2, 3, 4]


def _masker(**cfg) -> Masker:
    word_start = np.arange(V) % 2 == 0  # even ids start a word, odd ids continue one
    return Masker(
        MaskingConfig(**cfg),
        vocab_size=V,
        special_ids=SPECIALS,
        mask_token_id=MASK,
        pad_token_id=PAD,
        seed=11,
        word_start=word_start,
    )


def test_a_word_never_spans_a_special_token():
    """``10 11 [SEP] 13 15``: 13 continues a word by its id but follows a special token, so it starts a new word
    ({10, 11} and {13, 15}); over many draws 13 is sometimes selected without 10 and 10 without 13."""
    ids = torch.tensor([[CLS, 10, 11, SEP, 13, 15, SEP]])
    am = torch.ones_like(ids)
    masker = _masker(whole_word_mask=True, mlm_mask_prop=0.25)  # ceil(0.25 x 4) = 1 token: one word
    seen = set()
    for step in range(40):
        _, labels = masker(ids, am, step=step, rank=0, micro_step=0)
        sel = tuple((labels[0] != -100).tolist())
        assert sel in {(False, True, True, False, False, False, False), (False, False, False, False, True, True, False)}
        seen.add(sel)
    assert len(seen) == 2


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    "cfg,expected",
    [
        ({}, "5a0cf89df43009ce"),
        ({"whole_word_mask": True}, "d765f7a3b6ac41c7"),
    ],
)
def test_the_draws_are_pinned(cfg, expected):
    """The exact masks of a fixed batch (seed 11, step 3, rank 1, micro-step 2; token counts given) on CPU. They are
    part of what the demo's numbers depend on (docs/testing.md): a change in the sampling that keeps its
    distribution (a shifted word index, a reordered generator call) still changes every run's numbers, and fails
    here."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (4, 24), generator=g)
    am = torch.ones_like(ids)
    am[1, 18:] = 0
    am[3, 10:] = 0
    ids[:, 0] = CLS
    ids[am == 0] = PAD
    ids[2, 9] = SEP
    counts = np.arange(V) * 7 + 1
    masker = Masker(
        MaskingConfig(mlm_mask_prop=0.3, **cfg),
        vocab_size=V,
        special_ids=SPECIALS,
        mask_token_id=MASK,
        pad_token_id=PAD,
        token_counts=counts,
        seed=11,
        word_start=np.arange(V) % 3 != 1,
    )
    masked, labels = masker(ids, am, step=3, rank=1, micro_step=2)
    assert _digest(masked, labels) == expected


def test_whole_words_of_one_token_select_exactly_the_budget():
    """When every word is one token, whole-word masking takes words until the budget and not one more: exactly
    ceil(0.15 n), as token masking."""
    masker = Masker(
        MaskingConfig(whole_word_mask=True),
        vocab_size=V,
        special_ids=SPECIALS,
        mask_token_id=MASK,
        pad_token_id=PAD,
        word_start=np.ones(V, dtype=bool),
    )
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, V, (3, 20), generator=g)
    ids[:, 0] = CLS
    am = torch.ones_like(ids)
    for step in range(10):
        _, labels = masker(ids, am, step=step, rank=0, micro_step=0)
        assert int((labels != -100).sum()) == math.ceil(0.15 * 57)


def test_from_tokenizer_hands_over_the_counts_and_seed_zero(bert_tok):
    """from_tokenizer == the constructor with the tokenizer's ids, the token counts given and seed 0 by default; the
    counts change the draws (so a masker that dropped them would differ)."""
    v = len(bert_tok)
    counts = (np.arange(v) % 7) ** 3 * 100 + 1
    direct = Masker(
        MaskingConfig(),
        vocab_size=v,
        special_ids=bert_tok.all_special_ids,
        mask_token_id=bert_tok.mask_token_id,
        pad_token_id=bert_tok.pad_token_id,
        token_counts=counts,
        seed=0,
    )
    built = Masker.from_tokenizer(MaskingConfig(), bert_tok, token_counts=counts)
    uniform = Masker.from_tokenizer(MaskingConfig(), bert_tok)
    enc = bert_tok(["the quick brown fox jumps over the lazy dog"] * 6, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"])
    same = differ = 0
    for step in range(5):
        a = direct(*args, step=step, rank=0, micro_step=0)
        b = built(*args, step=step, rank=0, micro_step=0)
        c = uniform(*args, step=step, rank=0, micro_step=0)
        same += torch.equal(a[1], b[1])
        differ += not torch.equal(a[1], c[1])
    assert same == 5 and differ > 0
    seeded = Masker.from_tokenizer(MaskingConfig(), bert_tok, seed=5)
    direct5 = Masker(
        MaskingConfig(),
        vocab_size=v,
        special_ids=bert_tok.all_special_ids,
        mask_token_id=bert_tok.mask_token_id,
        pad_token_id=bert_tok.pad_token_id,
        seed=5,
    )
    assert seeded.seed == 5
    assert torch.equal(seeded(*args, step=0, rank=0, micro_step=0)[1], direct5(*args, step=0, rank=0, micro_step=0)[1])


def test_generator_seeds_are_pinned():
    """The 63-bit seeds mixed from (seed, step, rank, micro-step) (they decide every run's masks)."""
    from pretrain.masking import _seed

    got = [_seed(*a) for a in [(0, 0, 0, 0), (11, 3, 1, 2), (1, 2, 3, 4), (7, 0, 1, 0)]]
    assert got == [6375474604893067239, 6818139708457202285, 9130766517534196204, 4356932690223560731]
    assert all(0 <= s < 2**63 for s in got)


def test_counts_below_one_count_as_one_and_the_input_dtype_is_kept():
    """p ∝ max(count, 1) ** -s: counts 0 and 1 weigh the same, 2 less; the masked ids keep the input's dtype."""
    counts = np.full(V, 1000)
    counts[10], counts[11], counts[12] = 0, 1, 2
    m = Masker(
        MaskingConfig(), vocab_size=V, special_ids=SPECIALS, mask_token_id=MASK, pad_token_id=PAD, token_counts=counts
    )
    lp = m._cpu["log_probs"]
    assert float(lp[10]) == float(lp[11]) > float(lp[12])
    assert float(lp[11] - lp[12]) == pytest.approx(0.7 * math.log(2), rel=1e-5)
    ids = torch.randint(5, V, (2, 16), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    masked, labels = m(ids, torch.ones_like(ids), step=0, rank=0, micro_step=0)
    assert masked.dtype == torch.int32 and labels.dtype == torch.int64
