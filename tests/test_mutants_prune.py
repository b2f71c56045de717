"""Kill tests for the mutants of pretrain/prune.py that test_prune.py lets survive (docs/testing.md "Mutation
testing", docs/mutants-prune.md): the calibration sample against a hand collation of hand-written shards, the
per-sequence mean and top-k on hand values, the fused-axis slicing and the state-dict slicer on hand tensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import shards
from data_prep.shards import ShardWriter
from pretrain import prune
from pretrain.families import BERT_PRUNE, MODERNBERT_PRUNE

SEQS = [np.arange(10 + 10 * i, 10 + 10 * i + 1 + i % 5, dtype=np.uint16) for i in range(40)]  # lengths 1..5


def _shard_dir(directory: Path, tokenizer: dict) -> Path:
    """A prepared directory holding :data:`SEQS` as its train split (shards of about 16 tokens)."""
    directory.mkdir()
    w = ShardWriter(directory, "train", np.dtype(np.uint16), 16)
    for s in SEQS:
        w.write(s)
    manifest = {
        "format_version": shards.FORMAT_VERSION,
        "dtype": "uint16",
        "tokenizer": tokenizer,
        "splits": {"train": shards.split_summary(w.close(), len(SEQS))},
    }
    (directory / shards.MANIFEST).write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prune-shards")
    return (
        _shard_dir(root / "pad7", {"pad_token_id": 7, "sep_token_id": 2, "vocab_size": 1000}),
        _shard_dir(root / "nopad", {"sep_token_id": 2, "vocab_size": 1000}),
    )


def _collated(picks, pad: int, multiple: int) -> dict[str, torch.Tensor]:
    """The micro-batch of SEQS[picks] written out by hand: right-padded with ``pad`` to a multiple of ``multiple``."""
    longest = max(len(SEQS[i]) for i in picks)
    length = -(-longest // multiple) * multiple
    ids = torch.full((len(picks), length), pad, dtype=torch.int64)
    mask = torch.zeros((len(picks), length), dtype=torch.int64)
    for r, i in enumerate(picks):
        ids[r, : len(SEQS[i])] = torch.tensor(SEQS[i].astype(np.int64))
        mask[r, : len(SEQS[i])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _same(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k].dtype == torch.int64 and torch.equal(g[k], w[k]), k


def test_calibration_sample_is_the_seeded_draw_collated_by_hand(shard_dirs):
    pad7, nopad = shard_dirs
    pick = np.sort(np.random.default_rng(3).choice(40, size=35, replace=False)).tolist()
    assert len(set(pick)) == 35
    # defaults: micro-batches of 32, padded with the manifest's pad id to a multiple of 8
    _same(prune.calibration_batches(pad7, n=35, seed=3), [_collated(pick[:32], 7, 8), _collated(pick[32:], 7, 8)])
    # explicit batch size and multiple; the explicit pad id wins over the manifest's
    _same(
        prune.calibration_batches(pad7, n=35, seed=3, batch_size=20, multiple=3, pad_id=5),
        [_collated(pick[:20], 5, 3), _collated(pick[20:], 5, 3)],
    )
    # a manifest without a pad id pads with 0
    _same(
        prune.calibration_batches(nopad, n=35, seed=3, multiple=16),
        [_collated(pick[:32], 0, 16), _collated(pick[32:], 0, 16)],
    )
    # n = 1 is a valid sample; n >= the split's size takes every sequence in order
    _same(
        prune.calibration_batches(pad7, n=1, seed=3),
        [_collated(np.random.default_rng(3).choice(40, 1, replace=False).tolist(), 7, 8)],
    )
    every = [_collated(list(range(32)), 7, 8), _collated(list(range(32, 40)), 7, 8)]
    _same(prune.calibration_batches(pad7, n=40, seed=3), every)
    _same(prune.calibration_batches(pad7, n=50, seed=3), every)


def test_calibration_sample_goes_to_the_device_asked_for(shard_dirs):
    got = prune.calibration_batches(shard_dirs[0], n=3, seed=0, device="meta")
    assert [v.device.type for b in got for v in b.values()] == ["meta", "meta"]
    got = prune.calibration_batches(shard_dirs[0], n=3, seed=0)
    assert [v.device.type for b in got for v in b.values()] == ["cpu", "cpu"]


def test_sequence_mean_over_real_tokens_by_hand():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [50.0, 60.0]], [[5.0, -6.0], [70.0, 80.0], [90.0, 10.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.equal(prune._seq_mean(x, mask), torch.tensor([[2.0, 3.0], [5.0, -6.0]]))
    assert torch.equal(prune._seq_mean(x[..., 0], mask), torch.tensor([2.0, 5.0]))  # [B, L]: no trailing axes


def test_top_k_ties_go_to_the_lower_index_beyond_the_small_sort():
    # 32 equal scores: torch's unstable sort returns another order from 17 elements on
    assert prune.top_k(torch.zeros(32), 4) == [0, 1, 2, 3]
    scores = torch.tensor([1.0, 2.0] * 20)
    assert prune.top_k(scores, 5) == [1, 3, 5, 7, 9]


def _selection() -> prune.Selection:
    return prune.Selection(layer_map=[2], channels=[1, 3], heads=[[1]], neurons=[[0, 2]])


def test_fused_axes_cut_the_same_indices_in_every_block():
    sel = _selection()  # head_dim 2: kept head 1 -> attention channels 2, 3 of each 4-row block
    wqkv = torch.arange(12 * 4, dtype=torch.float32).reshape(12, 4)  # Q | K | V, 2 heads x 2 channels each
    got, names = prune._slice_axes("layers.0.attn.Wqkv.weight", wqkv, ("A3", "H"), 0, sel, 2)
    assert torch.equal(got, wqkv[[2, 3, 6, 7, 10, 11]][:, [1, 3]])
    assert names == ["heads[1] x3", "channels"]
    wi = torch.arange(8, dtype=torch.float32)  # input | gate, 4 neurons each
    got, names = prune._slice_axes("layers.0.mlp.Wi.bias", wi, ("F2",), 0, sel, 2)
    assert torch.equal(got, torch.tensor([0.0, 2.0, 4.0, 6.0])) and names == ["neurons x2"]
    got, names = prune._slice_axes("emb.weight", wqkv, (None, "H"), None, sel, 2)
    assert torch.equal(got, wqkv[:, [1, 3]]) and names == [":", "channels"]


def test_state_slicing_by_hand_with_a_family_layout_and_whole_copies():
    sel = _selection()
    t = {
        "model.layers.2.attn.Wqkv.weight": torch.arange(48, dtype=torch.float64).reshape(12, 4),
        "model.extra_buffer": torch.arange(5, dtype=torch.float64),  # no rule: copied whole
        "model.layers.2.attn.Wo.weight": torch.arange(16, dtype=torch.float64).reshape(4, 4),
    }
    shapes = {
        "model.extra_buffer": (5,),
        "model.layers.0.attn.Wqkv.weight": (6, 2),
        "model.layers.0.attn.Wo.weight": (2, 2),
    }
    state, copied = prune.slice_state(t, shapes, "model.layers", sel, 2, MODERNBERT_PRUNE)
    assert list(state) == list(shapes)  # every student tensor, the unruled one first did not end the loop
    assert all(v.dtype == torch.float32 for v in state.values())
    assert torch.equal(state["model.extra_buffer"], t["model.extra_buffer"].float())
    assert state["model.extra_buffer"].data_ptr() != t["model.extra_buffer"].data_ptr()
    assert torch.equal(
        state["model.layers.0.attn.Wqkv.weight"],
        t["model.layers.2.attn.Wqkv.weight"][[2, 3, 6, 7, 10, 11]][:, [1, 3]].float(),
    )
    assert torch.equal(
        state["model.layers.0.attn.Wo.weight"], t["model.layers.2.attn.Wo.weight"][[1, 3]][:, [2, 3]].float()
    )
    assert copied == {
        "model.extra_buffer": "model.extra_buffer",
        "model.layers.0.attn.Wqkv.weight": "model.layers.2.attn.Wqkv.weight[heads[1] x3, channels]",
        "model.layers.0.attn.Wo.weight": "model.layers.2.attn.Wo.weight[channels, heads[1]]",
    }
    # BERT's rules do not name ModernBERT's fused tensor: without its layout the slice is refused
    with pytest.raises(ValueError, match="no slicing rule"):
        prune.slice_state(t, shapes, "model.layers", sel, 2, BERT_PRUNE)
    # an unruled tensor of another shape, an A axis outside the layer list: refused, naming the tensor
    with pytest.raises(ValueError, match=r"model\.extra_buffer \(4,\): no slicing rule"):
        prune.slice_state(t, {"model.extra_buffer": (4,)}, "model.layers", sel, 2, MODERNBERT_PRUNE)
    outside = {"top.attention.self.query.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"^top\.attention\.self\.query\.bias: role A outside a layer"):
        prune.slice_state(outside, {"top.attention.self.query.bias": (2,)}, "model.layers", sel, 2)


def test_sample_digest_is_the_sha256_of_the_real_int64_ids():
    batches = [
        {"input_ids": torch.tensor([[5, 6, 0], [7, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])},
        {"input_ids": torch.tensor([[8, 9, 10]]), "attention_mask": torch.tensor([[1, 1, 1]])},
    ]
    h = hashlib.sha256()
    for row in ([5, 6], [7], [8, 9, 10]):
        h.update(np.array(row, dtype=np.int64).tobytes())
    assert prune._sample_digest(batches) == (3, 6, h.hexdigest())
