"""Dynamic masking: exact counts, 80/10/10 proportions, specials / pads, smoothing, whole words, determinism."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from pretrain.masking import Masker, MaskingConfig, word_starts_from_tokens
from pretrain.schema import ConfigError, from_dict
from tests import tiny

V = 400
SPECIALS = [0, 1, 2, 3, 4]  # pad, unk, cls, sep, mask
PAD, CLS, SEP, MASK = 0, 2, 3, 4


def make_masker(cfg=None, **kw) -> Masker:
    return Masker(
        cfg or MaskingConfig(), vocab_size=V, special_ids=SPECIALS, mask_token_id=MASK, pad_token_id=PAD, **kw
    )


def random_batch(seed: int, batch: int = 16, length: int = 64):
    """Token ids with CLS .. SEP, a special in the middle of some rows, and right padding of random length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (batch, length), generator=g)
    lengths = torch.randint(8, length + 1, (batch,), generator=g)
    am = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[::3, 5] = SEP  # a special token inside the sequence (two-segment input)
    ids[am == 0] = PAD
    return ids, am


def real_positions(ids, am):
    return am.bool() & ~torch.isin(ids, torch.tensor(SPECIALS))


def test_config_validation():
    assert from_dict(MaskingConfig, {}, "masking") == MaskingConfig()
    with pytest.raises(ConfigError, match=r"masking\.word_mask"):
        from_dict(MaskingConfig, {"word_mask": 0.7}, "masking")
    with pytest.raises(ConfigError, match=r"masking\.mlm_mask_prop"):
        from_dict(MaskingConfig, {"mlm_mask_prop": 0.0}, "masking")
    with pytest.raises(ConfigError, match=r"masking\.mlm_smoothing"):
        from_dict(MaskingConfig, {"mlm_smoothing": -1.0}, "masking")
    with pytest.raises(ConfigError, match=r"masking\.mlm_smoothing: inf must be a finite number >= 0"):
        from_dict(MaskingConfig, {"mlm_smoothing": float("inf")}, "masking")
    for key in ("mlm_mask_prop", "word_mask"):
        with pytest.raises(ConfigError, match=f"masking.{key}: nan"):
            from_dict(MaskingConfig, {key: float("nan")}, "masking")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(MaskingConfig, {"mask_prob": 0.15}, "masking")


def test_exact_count_and_proportions():
    """ceil(0.15 n) selected per micro-batch; specials / pads never; 80/10/10 over ~24k selections (5 sigma)."""
    masker = make_masker()
    n_sel = n_mask = n_keep = n_rand = 0
    for step in range(300):
        ids, am = random_batch(step)
        x, labels = masker(ids, am, step=step, rank=0, micro_step=0)
        sel = labels != -100
        real = real_positions(ids, am)
        assert int(sel.sum()) == math.ceil(Fraction("0.15") * int(real.sum()))
        assert not (sel & ~real).any(), "special or pad selected"
        assert torch.equal(x[~sel], ids[~sel]), "unselected positions changed"
        assert torch.equal(labels[sel], ids[sel])
        changed = x[sel]
        n_sel += int(sel.sum())
        n_mask += int((changed == MASK).sum())
        n_keep += int((changed == ids[sel]).sum())
        rand = (changed != MASK) & (changed != ids[sel])
        n_rand += int(rand.sum())
        assert not torch.isin(changed[rand], torch.tensor(SPECIALS)).any(), "random replacement is a special token"
    assert n_sel > 20_000
    assert abs(n_mask / n_sel - 0.8) < 0.01
    assert abs(n_keep / n_sel - 0.1) < 0.01
    assert abs(n_rand / n_sel - 0.1) < 0.01


def test_other_proportions():
    masker = make_masker(MaskingConfig(mlm_mask_prop=0.4, word_mask=0.5, word_keep=0.0, word_rand=0.5))
    ids, am = random_batch(7)
    tot = {"mask": 0, "keep": 0, "n": 0}
    for step in range(60):
        x, labels = masker(ids, am, step=step, rank=0, micro_step=0)
        sel = labels != -100
        assert int(sel.sum()) == math.ceil(Fraction("0.4") * int(real_positions(ids, am).sum()))
        tot["n"] += int(sel.sum())
        tot["mask"] += int((x[sel] == MASK).sum())
        tot["keep"] += int((x[sel] == ids[sel]).sum())
    assert abs(tot["mask"] / tot["n"] - 0.5) < 0.02
    assert tot["keep"] / tot["n"] < 0.01  # only random draws equal to the original


def test_smoothing_matches_multinomial_reference():
    """Selection follows p ∝ count^-0.7 without replacement: compare with torch.multinomial (DistilBERT's sampler)."""
    counts = np.full(V, 100, dtype=np.int64)
    counts[5] = 100_000  # frequent token A
    counts[6] = 100  # rarer token B
    ids = torch.full((8, 50), 5)
    ids[:, 25:] = 6
    am = torch.ones_like(ids)
    n_tgt = math.ceil(0.15 * ids.numel())
    fractions = {}
    for smoothing in (0.0, 0.7):
        masker = make_masker(MaskingConfig(mlm_smoothing=smoothing), token_counts=counts)
        got = []
        for step in range(200):
            _, labels = masker(ids, am, step=step, rank=0, micro_step=0)
            sel = labels != -100
            got.append(float((ids[sel] == 6).float().mean()))
        fractions[smoothing] = np.mean(got)
        p = np.maximum(counts, 1).astype(np.float64) ** -smoothing
        w = torch.tensor(p[ids.flatten().numpy()])
        g = torch.Generator().manual_seed(0)
        ref = [
            float((ids.flatten()[torch.multinomial(w, n_tgt, replacement=False, generator=g)] == 6).float().mean())
            for _ in range(200)
        ]
        assert abs(fractions[smoothing] - np.mean(ref)) < 0.02, (smoothing, fractions[smoothing], np.mean(ref))
    assert abs(fractions[0.0] - 0.5) < 0.03
    assert fractions[0.7] > 0.9  # (1000x rarer)^0.7 = 126x the weight: selections move to the rare token


def test_determinism():
    masker = make_masker()
    ids, am = random_batch(0)
    a = masker(ids, am, step=3, rank=1, micro_step=2)
    b = make_masker()(ids, am, step=3, rank=1, micro_step=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for kw in (
        {"step": 4, "rank": 1, "micro_step": 2},
        {"step": 3, "rank": 0, "micro_step": 2},
        {"step": 3, "rank": 1, "micro_step": 1},
    ):
        assert not torch.equal(masker(ids, am, **kw)[1], a[1]), kw
    assert not torch.equal(make_masker(seed=1)(ids, am, step=3, rank=1, micro_step=2)[1], a[1])


def test_word_starts_from_tokens():
    assert word_starts_from_tokens(["[CLS]", "dist", "##illed", "model", "##s"]).tolist() == [
        True,
        True,
        False,
        True,
        False,
    ]
    assert word_starts_from_tokens(["<s>", "The", "Ġquick", "est", "Ġfox"]).tolist() == [
        False,
        False,
        True,
        False,
        True,
    ]
    assert word_starts_from_tokens(["<s>", "▁The", "▁qu", "ick"]).tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="whole_word_mask"):
        word_starts_from_tokens(["a", "b", "c"])


def masker_words(tokens: list[str], real: list[bool], family: str) -> list[list[int]]:
    """The positions of each unit whole-word masking selects together, from the token strings: a maximal run of real
    (non-special, non-pad) tokens in which every token after the first continues a word (WordPiece: starts with
    ``##``; byte-level BPE: does not start with ``Ġ``). Punctuation attached to a word (``dog.``) joins it."""
    words: list[list[int]] = []
    for pos, (tok, ok) in enumerate(zip(tokens, real, strict=True)):
        continues = tok.startswith("##") if family == "bert" else not tok.startswith("Ġ")
        if ok and continues and words and words[-1][-1] == pos - 1:
            words[-1].append(pos)
        elif ok:
            words.append([pos])
    return words


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_whole_word_masking_keeps_words_whole(family):
    """Every tokenizer word (word_ids() of the fast tokenizer) is fully selected or not at all; token-level masking
    does split words on the same data (so the check can fail). The count bound is exact: words are taken (in key
    order) while fewer than n_tgt tokens are taken, so n_tgt <= selected and selected - (the last word's length) <
    n_tgt; not knowing the order, selected - (the longest selected word) < n_tgt."""
    tok = tiny.bert_tokenizer(vocab_size=150) if family == "bert" else tiny.roberta_tokenizer(vocab_size=300)
    enc = tok(tiny.corpus(1), padding=True, return_tensors="pt")
    ids, am = enc["input_ids"], enc["attention_mask"]
    word_ids = [enc.word_ids(i) for i in range(len(ids))]
    multi = sum(sum(1 for w in set(ws) if w is not None and ws.count(w) > 1) for ws in word_ids)
    assert multi > 10, "the test corpus must contain multi-piece words"
    real = am.bool() & ~torch.isin(ids, torch.tensor(tok.all_special_ids))
    n_real = int(real.sum())
    n_tgt = math.ceil(Fraction("0.15") * n_real)
    units = [
        masker_words(tok.convert_ids_to_tokens(ids[i].tolist()), real[i].tolist(), family) for i in range(len(ids))
    ]
    assert sum(len(w) for ws in units for w in ws) == n_real
    splits = {True: 0, False: 0}
    whole_multi_selected = 0
    for wwm in (True, False):
        masker = Masker.from_tokenizer(MaskingConfig(whole_word_mask=wwm), tok)
        for step in range(30):
            _, labels = masker(ids, am, step=step, rank=0, micro_step=0)
            sel = labels != -100
            if wwm:
                taken = [len(w) for i, ws in enumerate(units) for w in ws if bool(sel[i, w[0]])]
                assert all(bool(sel[i, p]) == bool(sel[i, w[0]]) for i, ws in enumerate(units) for w in ws for p in w)
                assert sum(taken) == int(sel.sum())  # nothing outside the units
                assert n_tgt <= int(sel.sum()) < n_tgt + max(taken), (n_tgt, int(sel.sum()), max(taken))
            for i, ws in enumerate(word_ids):
                groups: dict[int, list[bool]] = {}
                for pos, w in enumerate(ws):
                    if w is not None:
                        groups.setdefault(w, []).append(bool(sel[i, pos]))
                for states in groups.values():
                    splits[wwm] += len(set(states)) > 1
                    whole_multi_selected += wwm and len(states) > 1 and all(states)
    assert splits[True] == 0
    assert splits[False] > 0
    assert whole_multi_selected > 0


@pytest.mark.parametrize("word_length", [2, 3])
def test_whole_word_count_is_exact_when_every_word_has_one_length(word_length):
    """Words of ``word_length`` tokens each (a synthetic vocabulary: ids 5..99 start a word, 100.. continue one):
    taking whole words until at least n_tgt tokens are taken gives exactly word_length x ceil(n_tgt /
    word_length) tokens, for every n_tgt (batch sizes chosen so that n_tgt takes several residues)."""
    word_start = np.zeros(V, dtype=bool)
    word_start[5:100] = True
    masker = make_masker(MaskingConfig(whole_word_mask=True), word_start=word_start)
    g = torch.Generator().manual_seed(word_length)
    residues = set()
    for words in range(7, 60, 3):
        starts = torch.randint(5, 100, (words, 1), generator=g)
        rest = torch.randint(100, V, (words, word_length - 1), generator=g)
        ids = torch.cat([torch.tensor([CLS]), torch.cat([starts, rest], 1).flatten(), torch.tensor([SEP])])[None]
        am = torch.ones_like(ids)
        n_tgt = math.ceil(Fraction("0.15") * words * word_length)
        residues.add(n_tgt % word_length)
        for step in range(3):
            _, labels = masker(ids, am, step=step, rank=0, micro_step=0)
            assert int((labels != -100).sum()) == word_length * math.ceil(n_tgt / word_length), (words, n_tgt)
    assert residues == set(range(word_length))


def test_bad_inputs():
    with pytest.raises(ValueError, match="token_counts"):
        make_masker(token_counts=np.ones(V - 1))
    with pytest.raises(ValueError, match="word_start"):
        make_masker(MaskingConfig(whole_word_mask=True))


def test_masker_trusts_its_validated_config(monkeypatch):
    """The section is validated once, when the run config is loaded (schema.from_dict); the masker does not again."""
    monkeypatch.setattr(MaskingConfig, "validate", lambda self: pytest.fail("Masker validated its section again"))
    ids, am = random_batch(0)
    _masked, labels = make_masker()(ids, am, step=0, rank=0, micro_step=0)
    assert int((labels != -100).sum()) > 0


def test_count_is_of_non_special_tokens_and_the_docs_say_how_the_reference_differs():
    """15% of the non-special tokens, not of every non-pad token as DistilBERT's distiller.py counts (lengths.sum(),
    [CLS] / [SEP] included); the help text and the module docstring say so."""
    import pretrain.masking as M

    ids = torch.full((1, 22), PAD)
    ids[0, 0], ids[0, 21] = CLS, SEP
    ids[0, 1:21] = torch.arange(20) + 10  # 20 ordinary tokens between CLS and SEP: ceil(0.15 * 20) = 3
    am = torch.ones_like(ids)
    _, labels = make_masker()(ids, am, step=0, rank=0, micro_step=0)
    assert int((labels != -100).sum()) == 3 != math.ceil(0.15 * 22)  # the reference's count would be 4
    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(MaskingConfig)}["mlm_mask_prop"]
    assert "non-special" in help_text and "distiller.py counts [CLS] / [SEP]" in help_text
    assert "[CLS] / [SEP] included (``lengths.sum()``)" in M.__doc__
