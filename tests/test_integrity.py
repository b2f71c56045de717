"""Shard integrity in training (issue 20 item 4): a shard whose size differs from manifest.json is refused when the
split is opened; one whose bytes differ is found by the background hash and refused at the next batch, naming the
file, both sha256 and what to run."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from data_prep.files import sha256_file
from pretrain.schema import ConfigError
from tests.helpers import REPO, assets, tiny_overrides, train_in_process

TINY = REPO / "configs" / "tiny-cpu.json"


def corrupt_copy(tmp_path: Path) -> tuple[Path, Path, str]:
    """A copy of the tiny BERT shards with one byte of the first train shard flipped (same size): ``(dir, shard,
    the manifest's sha256 of it)``."""
    shards = tmp_path / "shards"
    shutil.copytree(assets()["shards-bert"], shards)
    record = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    shard = shards / record["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return shards, shard, record["sha256"]


def test_a_flipped_byte_is_refused_at_the_next_batch_naming_file_hashes_and_the_fix(tmp_path):
    from pretrain.data import BatchLoader, DataOrder, ShardIntegrityError, open_split

    shards, shard, expected = corrupt_copy(tmp_path)
    ds = open_split(shards, "train")  # the size is right: opening works, hashing starts in the background
    loader = BatchLoader(ds, DataOrder(len(ds), micro_batch=2, world_size=1, rank=0, seed=0), pad_id=0, prefetch=0)
    end = time.time() + 30
    with pytest.raises(ShardIntegrityError) as e:
        while time.time() < end:
            next(loader)
            time.sleep(0.01)
    msg = str(e.value)
    assert msg.startswith(f"data.dir: {shard}: sha256 {sha256_file(shard)} does not match the manifest's {expected}")
    assert f"python -m data_prep verify {shards}" in msg and "prepare the data again" in msg
    with pytest.raises(ShardIntegrityError):  # every later fetch refuses too
        next(loader)


def test_intact_shards_are_hashed_once_per_process_and_pass(tmp_path):
    from data_prep.shards import HASHER
    from pretrain.data import check_shards, open_split

    shards = tmp_path / "shards"
    shutil.copytree(assets()["shards-bert"], shards)
    a, b = open_split(shards, "train"), open_split(shards, "train")
    first = HASHER.submit(shards / "train-00000.bin")
    assert HASHER.submit(shards / "train-00000.bin") is first  # one hash of each file per process
    first.result(timeout=30)
    for fut in [f for _, _, f in a._hashes]:
        fut.result(timeout=30)
    check_shards(a)
    check_shards(b)
    assert a.verify_problem() is None and a._hashes == []  # all checked: later calls cost nothing


def test_a_shard_of_another_size_is_refused_when_the_split_is_opened(tmp_path):
    from pretrain.data import open_split

    shards = tmp_path / "shards"
    shutil.copytree(assets()["shards-bert"], shards)
    shard = shards / "train-00000.bin"
    with open(shard, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ConfigError, match=r"train-00000\.bin: missing or not \d+ bytes as the manifest says"):
        open_split(shards, "train")


def test_training_on_a_corrupted_shard_stops_with_the_message(tmp_path):
    from pretrain.config import load
    from pretrain.data import ShardIntegrityError

    shards, shard, expected = corrupt_copy(tmp_path)
    out = tmp_path / "run"
    over = tiny_overrides(
        "bert",
        out,
        steps=400,
        **{"data.dir": str(shards), "train.save_interval": 0, "train.eval_interval": 0, "train.export_init": False},
    )
    with pytest.raises(ShardIntegrityError, match=f"{shard}: sha256 .* does not match the manifest's {expected}"):
        train_in_process(load(TINY, over))
    assert not (out / "student").exists()
