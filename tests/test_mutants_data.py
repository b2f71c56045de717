"""pretrain/data.py: the tests that kill mutants test_train_data.py leaves alive (docs/testing.md "Mutation
testing", docs/mutants-data.md): the config's ranges, opening a split, collation against a hand-built reference, the
cursor across a layout change, the loader's read-ahead, thread, padding, integrity check and close; evaluation
batches' padding and integrity check."""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import shards
from data_prep.shards import ShardWriter
from pretrain.data import (
    BatchLoader,
    DataConfig,
    DataOrder,
    ShardIntegrityError,
    check_shards,
    collate,
    eval_batches,
    open_split,
)
from pretrain.schema import ConfigError


class Data:
    def __init__(self, n: int, problem: str | None = None):
        self.n, self.problem = n, problem

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full(1 + i % 5, 100 + i, dtype=np.uint16)

    def verify_problem(self):
        return self.problem


def test_loader_resumes_across_a_layout_change_when_allowed():
    a = DataOrder(100, micro_batch=4, world_size=2, rank=0, seed=3)
    for _ in range(5):
        a.next()
    loader = BatchLoader(Data(100), DataOrder(100, micro_batch=4, world_size=4, rank=0, seed=3), pad_id=0, prefetch=0)
    loader.load_state_dict(a.state_dict(), allow_layout_change=True)
    assert (loader.order.epoch, loader.order.batch) == (0, 3)
    other = BatchLoader(Data(100), DataOrder(100, micro_batch=4, world_size=4, rank=0, seed=3), pad_id=0, prefetch=0)
    with pytest.raises(ConfigError, match="allow_world_size_change"):
        other.load_state_dict(a.state_dict())  # not allowed by default


def test_eval_batches_pad_with_the_pad_id_to_multiples_of_8_and_check_the_shards():
    batches = list(eval_batches(Data(6), micro_batch=3, world_size=1, rank=0, max_sequences=0, pad_id=7))
    ids = batches[0]["input_ids"]
    assert ids.shape == (3, 8)
    assert ids[0].tolist() == [100] + [7] * 7
    four = next(eval_batches(Data(6), micro_batch=3, world_size=1, rank=0, max_sequences=0, pad_id=7, multiple=4))
    assert four["input_ids"].shape == (3, 4)
    with pytest.raises(ShardIntegrityError, match=r"data\.dir: bad shard"):
        list(eval_batches(Data(6, "bad shard"), micro_batch=3, world_size=1, rank=0, max_sequences=0, pad_id=0))


def test_config_range_edges_are_accepted():
    DataConfig(pad_to_multiple_of=1, prefetch=0).validate()  # >= 1 and >= 0: the edges included


@pytest.mark.parametrize(
    "values,message",
    [
        ({"pad_to_multiple_of": 0}, "data.pad_to_multiple_of: 0 must be >= 1"),
        ({"prefetch": -1}, "data.prefetch: -1 must be >= 0"),
    ],
)
def test_config_out_of_range_is_refused_naming_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        DataConfig(**values).validate()
    assert str(err.value) == message


def _shard_dir(directory: Path, splits: dict[str, list[np.ndarray]]) -> Path:
    """A prepared directory (ShardWriter, shards of about 8 tokens, a manifest) holding these sequences per split."""
    directory.mkdir()
    records = {}
    for split, seqs in splits.items():
        w = ShardWriter(directory, split, np.dtype(np.uint16), 8)
        for s in seqs:
            w.write(s)
        records[split] = shards.split_summary(w.close(), len(seqs))
    manifest = {
        "format_version": shards.FORMAT_VERSION,
        "dtype": "uint16",
        "tokenizer": {"sep_token_id": 2, "vocab_size": 1000},
        "splits": records,
    }
    (directory / shards.MANIFEST).write_text(json.dumps(manifest))
    return directory


def _seqs(n: int, first: int) -> list[np.ndarray]:
    return [np.arange(first + 10 * i, first + 10 * i + 3 + i % 4, dtype=np.uint16) for i in range(n)]


def test_open_split_errors_name_the_default_key_and_how_to_prepare(tmp_path):
    missing = str(tmp_path / "nowhere")  # data.dir: a string from the config
    with pytest.raises(ConfigError) as err:
        open_split(missing, "train")
    assert str(err.value) == (
        f"data.dir: {missing!r}: no such directory; run `python -m data_prep prepare ... --output {missing}` first"
    )


def test_open_split_opens_the_split_asked_for_and_refuses_only_an_empty_one(tmp_path):
    train, valid = _seqs(5, 100), _seqs(1, 900)
    directory = _shard_dir(tmp_path / "shards", {"train": train, "valid": valid, "empty": []})
    ds = open_split(directory, "valid", verify=False)  # one sequence: enough
    assert len(ds) == 1 and ds[0].tolist() == valid[0].tolist()
    tr = open_split(directory, "train", verify=False)
    assert [tr[i].tolist() for i in range(len(tr))] == [s.tolist() for s in train]
    with pytest.raises(ConfigError, match=r"^data\.dir: .*manifest\.json has no sequences in split 'empty'"):
        open_split(directory, "empty", verify=False)


def test_open_split_hashes_the_files_in_the_background_by_default(tmp_path):
    directory = _shard_dir(tmp_path / "shards", {"train": _seqs(6, 100)})
    record = json.loads((directory / shards.MANIFEST).read_text())["splits"]["train"]["shards"][0]
    shard = directory / record["file"]
    data = bytearray(shard.read_bytes())
    data[0] ^= 0x01  # same size: opening works, only the hash finds it
    shard.write_bytes(bytes(data))
    ds, unverified = open_split(directory, "train"), open_split(directory, "train", verify=False)
    for r in json.loads((directory / shards.MANIFEST).read_text())["splits"]["train"]["shards"]:
        for name in ("file", "index_file"):
            shards.HASHER.submit(directory / r[name]).result(timeout=30)  # the same futures the split waits on
    with pytest.raises(ShardIntegrityError, match=rf"^data\.dir: {re.escape(str(shard))}: sha256 "):
        check_shards(ds)
    check_shards(unverified)  # not hashed: nothing to report


def test_collate_pads_right_to_multiples_of_8_by_default_as_int64():
    seqs = [np.arange(1, 10, dtype=np.uint16), np.array([5, 6, 7], dtype=np.uint16)]
    out = collate(seqs, 9)
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.int64
    assert out["input_ids"].tolist() == [list(range(1, 10)) + [9] * 7, [5, 6, 7] + [9] * 13]
    assert out["attention_mask"].tolist() == [[1] * 9 + [0] * 7, [1] * 3 + [0] * 13]


def test_a_layout_change_that_reaches_the_epoch_end_starts_the_next_epoch():
    """Old layout 2 ranks x 4 (12 micro-batches an epoch), cursor at epoch 2 batch 11: 88 sequences consumed; the new
    layout 4 x 4 has 6 micro-batches an epoch and ceil(88 / 16) = 6 is the end of the epoch: epoch 3, batch 0."""
    old = DataOrder(100, micro_batch=4, world_size=2, rank=0, seed=3)
    for _ in range(2 * 12 + 11):
        old.next()
    assert (old.epoch, old.batch) == (2, 11)
    new = DataOrder(100, micro_batch=4, world_size=4, rank=1, seed=3)
    new.load_state_dict(old.state_dict(), allow_layout_change=True)
    assert (new.epoch, new.batch) == (3, 0)
    perm = np.random.default_rng([3, 3]).permutation(100)
    assert new.indices(*new.next()).tolist() == perm[1:16:4].tolist()


class Recording(Data):
    """Data that records each read: (index, thread id), optionally sleeping ``delay`` seconds first."""

    def __init__(self, n: int, delay: float = 0.0):
        super().__init__(n)
        self.delay, self.lock = delay, threading.Lock()
        self.reads: list[tuple[int, int]] = []

    def __getitem__(self, i):
        time.sleep(self.delay)
        with self.lock:
            self.reads.append((i, threading.get_ident()))
        return super().__getitem__(i)


def _drain(loader: BatchLoader) -> None:
    """Wait for every batch the loader prepared ahead."""
    concurrent.futures.wait([f for _, f in loader._pending], timeout=30)


def _reference(order: DataOrder, batches: list[tuple[int, int]]) -> list[int]:
    """The sequence indices of these micro-batches, in order."""
    return [int(i) for pos in batches for i in order.indices(*pos)]


def test_loader_reads_two_batches_ahead_once_each_in_one_background_thread():
    ds = Recording(40, delay=0.005)
    ref = DataOrder(40, micro_batch=2, world_size=1, rank=0, seed=1)
    loader = BatchLoader(ds, DataOrder(40, micro_batch=2, world_size=1, rank=0, seed=1), pad_id=0)  # prefetch 2
    try:
        for step in range(3):
            batch = next(loader)
            _drain(loader)
            assert [i for i, _ in ds.reads] == _reference(ref, [(0, b) for b in range(step + 3)])
            want = collate([Data(40)[int(i)] for i in ref.indices(0, step)], 0)
            assert all(torch.equal(batch[k], want[k]) for k in want)
    finally:
        loader.close()
    threads = {t for _, t in ds.reads}
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_loader_without_prefetch_reads_in_the_calling_thread():
    ds = Recording(10)
    loader = BatchLoader(ds, DataOrder(10, micro_batch=2, world_size=1, rank=0, seed=0), pad_id=0, prefetch=0)
    next(loader)
    next(loader)
    assert len(ds.reads) == 4 and {t for _, t in ds.reads} == {threading.get_ident()}


def test_loader_follows_its_order_when_the_cursor_is_moved_directly():
    ds = Data(40)
    ref = DataOrder(40, micro_batch=2, world_size=1, rank=0, seed=1)
    loader = BatchLoader(ds, DataOrder(40, micro_batch=2, world_size=1, rank=0, seed=1), pad_id=0)
    try:
        next(loader)
        _drain(loader)
        loader.order.next()  # batch 1 skipped behind the loader's back: its prefetched batch is dropped
        got = next(loader)
    finally:
        loader.close()
    want = collate([ds[int(i)] for i in ref.indices(0, 2)], 0)
    assert torch.equal(got["input_ids"], want["input_ids"])


def test_loader_pads_with_its_pad_id_to_its_multiple():
    ds = Data(10)
    ref = DataOrder(10, micro_batch=3, world_size=1, rank=0, seed=2)
    loader = BatchLoader(
        ds, DataOrder(10, micro_batch=3, world_size=1, rank=0, seed=2), pad_id=7, multiple=3, prefetch=0
    )
    batch = next(loader)
    seqs = [ds[int(i)] for i in ref.indices(0, 0)]
    length = -(-max(len(s) for s in seqs) // 3) * 3
    assert batch["input_ids"].tolist() == [s.tolist() + [7] * (length - len(s)) for s in seqs]


def test_loader_checks_the_shards_before_each_batch():
    loader = BatchLoader(Data(8, "bad shard"), DataOrder(8, micro_batch=2, world_size=1, rank=0, seed=0), pad_id=0)
    try:
        with pytest.raises(ShardIntegrityError, match=r"^data\.dir: bad shard$"):
            next(loader)
    finally:
        loader.close()


def test_loader_pins_each_tensor_when_asked(monkeypatch):
    pinned = []

    def pin(t):  # no accelerator here: a stand-in that records the call
        pinned.append(t)
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    ds = Data(8)
    loader = BatchLoader(
        ds,
        DataOrder(8, micro_batch=2, world_size=1, rank=0, seed=0, shuffle=False),
        pad_id=0,
        prefetch=0,
        pin_memory=True,
    )
    batch = next(loader)
    want = collate([ds[0], ds[1]], 0)
    assert sorted(batch) == ["attention_mask", "input_ids"] and len(pinned) == 2
    assert all(torch.equal(batch[k], want[k]) for k in want)


def test_close_cancels_queued_batches_without_waiting_for_the_running_one():
    """Batch 1's first read blocks on a gate the test opens only after close() returned: close must not wait for it
    (the read sees the gate open in time) and must cancel batch 2, still queued (never read)."""
    ref = DataOrder(20, micro_batch=2, world_size=1, rank=0, seed=4)
    gated = int(ref.indices(0, 1)[0])
    entered, gate, opened = threading.Event(), threading.Event(), []

    class Gated(Recording):
        def __getitem__(self, i):
            if i == gated:
                entered.set()
                opened.append(gate.wait(timeout=2))
            return super().__getitem__(i)

    ds = Gated(20)
    loader = BatchLoader(ds, DataOrder(20, micro_batch=2, world_size=1, rank=0, seed=4), pad_id=0)
    next(loader)
    assert entered.wait(timeout=30)
    loader.close()
    gate.set()
    assert loader._pool is not None
    loader._pool.shutdown(wait=True)  # let the running read finish
    assert opened == [True]
    assert [i for i, _ in ds.reads] == _reference(ref, [(0, 0), (0, 1)])
