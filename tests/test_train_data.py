"""Data order, resumable cursor, collate, prefetching loader, evaluation batches, and checkpoint verification. Fast."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from pretrain.checkpoint import MANIFEST, CheckpointManager, sha256_file, verify
from pretrain.data import BatchLoader, DataOrder, collate, eval_batches
from pretrain.schema import ConfigError


class FakeData:
    """Sequence i = [1000 + i] * (1 + i % 11): ids identify the sequence; lengths vary."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full(1 + i % 11, 1000 + i, dtype=np.uint16)


def test_collate_pads_to_multiple_with_mask():
    b = collate([np.array([5, 6, 7]), np.array([8] * 9, dtype=np.uint16)], pad_id=1, multiple=8)
    assert b["input_ids"].shape == (2, 16) and b["input_ids"].dtype == torch.int64
    assert b["input_ids"][0, :3].tolist() == [5, 6, 7] and (b["input_ids"][0, 3:] == 1).all()
    assert b["attention_mask"].sum(1).tolist() == [3, 9] and b["attention_mask"][1, 9:].sum() == 0
    assert collate([np.arange(16)], pad_id=0, multiple=8)["input_ids"].shape == (1, 16)


def test_order_is_rank_strided_disjoint_and_reshuffled_per_epoch():
    n, micro, world = 103, 4, 3
    orders = [DataOrder(n, micro_batch=micro, world_size=world, rank=r, seed=7) for r in range(world)]
    assert orders[0].batches_per_epoch == 103 // 12 == 8
    for epoch in (0, 1):
        seen = [np.concatenate([o.indices(epoch, b) for b in range(o.batches_per_epoch)]) for o in orders]
        flat = np.concatenate(seen)
        assert len(flat) == len(set(flat.tolist())) == 8 * 12  # disjoint over ranks, no repeats in an epoch
        perm = orders[0].permutation(epoch)
        assert sorted(flat.tolist()) == sorted(perm[:96].tolist())
        # rank r holds positions r, r + world, ... of each global micro-batch
        assert orders[1].indices(epoch, 2).tolist() == perm[24 + 1 : 36 : 3].tolist()
    assert not np.array_equal(orders[0].permutation(0), orders[0].permutation(1))
    same = DataOrder(n, micro_batch=micro, world_size=world, rank=0, seed=7)
    other = DataOrder(n, micro_batch=micro, world_size=world, rank=0, seed=8)
    assert np.array_equal(same.permutation(3), orders[0].permutation(3))
    assert not np.array_equal(other.permutation(0), orders[0].permutation(0))
    plain = DataOrder(n, micro_batch=micro, world_size=world, rank=0, seed=7, shuffle=False)
    assert plain.indices(0, 1).tolist() == [12, 15, 18, 21]


def test_cursor_wraps_epochs_and_resumes_exactly():
    o = DataOrder(50, micro_batch=4, world_size=2, rank=1, seed=3)  # 6 micro-batches per epoch
    seq = [o.next() for _ in range(14)]
    assert seq[5] == (0, 5) and seq[6] == (1, 0) and seq[13] == (2, 1)
    a = DataOrder(50, micro_batch=4, world_size=2, rank=1, seed=3)
    for _ in range(9):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))
    b = DataOrder(50, micro_batch=4, world_size=2, rank=1, seed=3)
    b.load_state_dict(state)
    assert [b.next() for _ in range(5)] == [a.next() for _ in range(5)]


def test_layout_change_refused_unless_allowed():
    a = DataOrder(100, micro_batch=4, world_size=2, rank=0, seed=3)
    for _ in range(5):  # 5 x 8 = 40 sequences of epoch 0 consumed
        a.next()
    b = DataOrder(100, micro_batch=4, world_size=4, rank=0, seed=3)
    with pytest.raises(ConfigError, match="allow_world_size_change"):
        b.load_state_dict(a.state_dict())
    b.load_state_dict(a.state_dict(), allow_layout_change=True)
    assert (b.epoch, b.batch) == (0, 3)  # first global micro-batch (16 sequences) starting at or after 40: 48
    with pytest.raises(ConfigError, match="100 sequences"):
        DataOrder(99, micro_batch=4, world_size=2, rank=0, seed=3).load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match=r"train\.seed"):
        DataOrder(100, micro_batch=4, world_size=2, rank=0, seed=4).load_state_dict(a.state_dict())
    with pytest.raises(ConfigError, match="fewer than one global micro-batch"):
        DataOrder(7, micro_batch=4, world_size=2, rank=0, seed=3)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_loader_batches_follow_the_order_and_resume(prefetch):
    data = FakeData(60)
    ref_order = DataOrder(60, micro_batch=3, world_size=2, rank=1, seed=5)
    loader = BatchLoader(data, DataOrder(60, micro_batch=3, world_size=2, rank=1, seed=5), pad_id=0, prefetch=prefetch)
    got = [next(loader) for _ in range(7)]
    for batch in got:
        idx = ref_order.indices(*ref_order.next())
        ids = batch["input_ids"]
        assert ids.shape[1] % 8 == 0
        assert [int(ids[j, 0]) - 1000 for j in range(3)] == idx.tolist()
        assert batch["attention_mask"].sum(1).tolist() == [1 + i % 11 for i in idx]
    state = loader.state_dict()
    expected = [next(loader) for _ in range(4)]
    other = BatchLoader(data, DataOrder(60, micro_batch=3, world_size=2, rank=1, seed=5), pad_id=0, prefetch=prefetch)
    next(other)  # moves (and prefetches) elsewhere; load_state_dict must drop that
    other.load_state_dict(state)
    for e, g in zip(expected, [next(other) for _ in range(4)], strict=False):
        assert torch.equal(e["input_ids"], g["input_ids"])
    loader.close()
    other.close()


def test_eval_batches_equal_counts_disjoint_ranks():
    data = FakeData(23)
    per_rank = [
        list(eval_batches(data, micro_batch=4, world_size=3, rank=r, max_sequences=0, pad_id=0)) for r in range(3)
    ]
    assert [len(b) for b in per_rank] == [2, 2, 2]  # 7 sequences each: 4 + 3
    ids = [int(x) - 1000 for b in per_rank for batch in b for x in batch["input_ids"][:, 0]]
    assert len(ids) == 21 == len(set(ids))
    capped = list(eval_batches(data, micro_batch=4, world_size=3, rank=0, max_sequences=9, pad_id=0))
    assert sum(b["input_ids"].shape[0] for b in capped) == 3


def test_real_shards_through_the_loader():
    from data_prep.shards import ShardedTokens
    from tests.helpers import assets

    ds = ShardedTokens(assets()["shards-roberta"], "train")
    order = DataOrder(len(ds), micro_batch=4, world_size=2, rank=0, seed=1)
    loader = BatchLoader(ds, order, pad_id=1, prefetch=2)
    idx = DataOrder(len(ds), micro_batch=4, world_size=2, rank=0, seed=1).indices(0, 0)
    batch = next(loader)
    for row, i in enumerate(idx):
        seq = ds[int(i)]
        assert batch["input_ids"][row, : len(seq)].tolist() == seq.tolist()
        assert seq[0] == 0 and seq[-1] == 2  # <s> ... </s>
    loader.close()


def reference_documents(directory, split: str) -> list[list[int]]:
    """Every document of a split read from the whole arrays at once (manifest.json, then each shard's index with
    np.load and its tokens with np.fromfile): each sequence without its first and last token (CLS / SEP), the stream
    of all of them cut after each separator (the one that ends every document)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    sep, dtype = manifest["tokenizer"]["sep_token_id"], np.dtype(manifest["dtype"])
    content = []
    for shard in manifest["splits"][split]["shards"]:
        index = np.load(directory / shard["index_file"])
        tokens = np.fromfile(directory / shard["file"], dtype=dtype)
        assert index[0] == 0 and index[-1] == len(tokens)
        content += [tokens[a + 1 : b - 1] for a, b in itertools.pairwise(index.tolist())]
    stream = np.concatenate(content).tolist()
    docs: list[list[int]] = []
    current: list[int] = []
    for t in stream:
        if t == sep:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs + ([current] if current else [])


@pytest.fixture(scope="module")
def multi_shard_dir(tmp_path_factory):
    """The test corpus (72 documents of ~150 tokens) prepared with 64-token sequences in shards of ~2,000 tokens:
    several shards, each document spread over about three sequences."""
    from data_prep.prepare import PrepareConfig, prepare
    from tests.helpers import SEQ, assets

    out = tmp_path_factory.mktemp("blocks") / "shards"
    root = assets()["root"]
    cfg = PrepareConfig(
        sources=[f"text:{root / 'corpus.txt'}"],
        tokenizer=str(assets()["roberta"]),
        max_seq_length=SEQ,
        output=str(out),
        valid_fraction=0.0,
        shard_tokens=2000,
        num_proc=0,
        progress=False,
    )
    prepare(cfg)
    return out


@pytest.mark.parametrize("block", [1, 5, 7, 4096])
def test_documents_read_in_blocks_equal_the_whole_arrays(multi_shard_dir, block):
    """``ShardedTokens.documents`` reading ``block`` sequences at a time (real shards hold ~65k sequences and are
    read in 4,096-sequence blocks; a block below the shard's sequence count puts documents across blocks) gives
    the documents of the whole arrays, in order, and as many as the manifest counts."""
    from data_prep.shards import ShardedTokens

    ds = ShardedTokens(multi_shard_dir, "train")
    shards = ds.manifest["splits"]["train"]["shards"]
    assert len(shards) >= 3 and all(s["num_sequences"] > 7 for s in shards)
    want = reference_documents(multi_shard_dir, "train")
    assert len(want) == ds.manifest["splits"]["train"]["num_documents"] == 72
    assert min(len(d) for d in want) > 2 * 62  # each document over three sequences or more, so across blocks
    got = [d.tolist() for d in ds.documents(block_sequences=block)]
    assert got == want


# ------------------------------------------------------------------------------------------------ checkpoints


def fake_tag(root, step, files=None, complete=True):
    tag = root / f"step_{step:08d}"
    tag.mkdir(parents=True)
    for name, data in (files or {"mp_rank_00_model_states.pt": b"x" * 100, "hf/config.json": b"{}"}).items():
        (tag / name).parent.mkdir(parents=True, exist_ok=True)
        (tag / name).write_bytes(data)
    if complete:
        listed = {
            str(p.relative_to(tag)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in tag.rglob("*")
            if p.is_file()
        }
        (tag / MANIFEST).write_text(json.dumps({"step": step, "world_size": 2, "files": listed}))
    return tag


def test_verify_detects_partial_truncated_and_corrupted(tmp_path):
    tag = fake_tag(tmp_path, 10)
    assert verify(tag)["step"] == 10
    f = tag / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[50] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt does not match its sha256"):
        verify(tag)
    f.write_bytes(bytes(data[:60]))
    with pytest.raises(ValueError, match="has 60 bytes"):
        verify(tag)
    f.unlink()
    with pytest.raises(ValueError, match="is missing"):
        verify(tag)
    with pytest.raises(ValueError, match="did not finish"):
        verify(fake_tag(tmp_path, 20, complete=False))


def test_find_resume_skips_bad_checkpoints_with_a_warning(tmp_path):
    from pretrain.rundir import RunDir

    run = RunDir(tmp_path)
    root = run.checkpoints
    root.mkdir()
    mgr = CheckpointManager(run, rank=0, world_size=2, keep_last=2, save_interval=0, all_ok=lambda ok: ok)
    assert mgr.find_resume() == (None, None, [])
    fake_tag(root, 5)
    fake_tag(root, 10)
    fake_tag(root, 15, complete=False)  # cut off while saving
    tag, manifest, notes = mgr.find_resume()
    assert tag == "step_00000010" and manifest is not None and manifest["step"] == 10
    assert len(notes) == 1 and "step_00000015" in notes[0] and "did not finish" in notes[0]
    (root / "step_00000010" / "hf" / "config.json").write_bytes(b"[]")  # same size, other bytes
    tag, _, notes = mgr.find_resume()
    assert tag == "step_00000005" and "step_00000010" in notes[1] and "sha256" in notes[1]
    fake_tag(root, 20)  # a manifest whose file entry lacks its size: skipped, not a KeyError
    manifest = json.loads((root / "step_00000020" / MANIFEST).read_text())
    del next(iter(manifest["files"].values()))["bytes"]
    (root / "step_00000020" / MANIFEST).write_text(json.dumps(manifest))
    tag, _, notes = mgr.find_resume()
    assert tag == "step_00000005" and "step_00000020" in notes[0] and "malformed" in notes[0]
    for t in ("step_00000005", "step_00000020"):
        (root / t / MANIFEST).unlink()
    with pytest.raises(ValueError, match="none is complete"):
        mgr.find_resume()
