"""pretrain/data.py: the tests that kill mutants test_train_data.py leaves alive (docs/testing.md "Mutation
testing"): a loader resumed across a layout change, evaluation batches' padding and integrity check."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.data import BatchLoader, DataOrder, ShardIntegrityError, eval_batches
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
