"""Training data: memory-mapped shards, a deterministic rank-strided order, a resumable cursor, padded micro-batches.

The order (:class:`DataOrder`): every epoch is a permutation of the split's sequences drawn from ``(seed, epoch)``
(``numpy.random.default_rng``), cut into global micro-batches of ``micro x world_size`` sequences; rank ``r`` takes
positions ``r, r + world_size, ...`` of each (rank-strided, disjoint). The tail that does not fill a global micro-batch
is left out of that epoch (it is in the next epochs' permutations). Every rank sees the same number of micro-batches
per epoch, so no rank waits in a collective for another that ran out of data. The cursor ``(epoch, batch)`` counts
micro-batches handed out; it is the same on every rank and is saved in checkpoints, so a resumed run reads exactly the
batches it would have read.

:class:`BatchLoader` turns the order into collated micro-batches (``input_ids``, ``attention_mask``) padded to a
multiple of 8 and prepares the next ones in a background thread while the current step runs.

Integrity: :func:`open_split` refuses a shard whose size differs from ``manifest.json`` at once, and starts hashing
every shard and index file of the split in a background thread (each file once per process,
``ShardedTokens.start_verify``), so the first step does not wait for a read of the whole corpus. The first micro-batch
fetched after a hash turned out different from the manifest (:class:`BatchLoader`, :func:`eval_batches`) raises
:class:`ShardIntegrityError` naming the file, both sha256 and what to run. A run shorter than the hashing of its
corpus ends before every file is checked.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.schema import ConfigError, check, param


@dataclasses.dataclass
class DataConfig:
    """The prepared shards and how batches are read from them."""

    dir: str = param(
        "",
        help="Directory of shards made by `python -m data_prep prepare` (manifest.json, shard "
        "files, token_counts.npy); train and valid splits. Required unless task.name is set "
        "(task distillation reads labeled examples instead).",
    )
    shuffle: bool = param(
        True,
        help="Reshuffle the train sequences every epoch from (train.seed, epoch); false = shard order (for debugging).",
    )
    pad_to_multiple_of: int = param(
        8, help="Pad each micro-batch to the next multiple of this many tokens (8: tensor-core friendly shapes)."
    )
    prefetch: int = param(2, help="Micro-batches prepared ahead in a background thread (0 = none).")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming ``data.<key>``."""
        check(self.pad_to_multiple_of >= 1, "data.pad_to_multiple_of", f"{self.pad_to_multiple_of} must be >= 1")
        check(self.prefetch >= 0, "data.prefetch", f"{self.prefetch} must be >= 0")


class ShardIntegrityError(ConfigError):
    """A shard or index file's sha256 differs from its ``manifest.json`` record (found by the background hash of
    :func:`open_split`); the message names the file, the expected and actual sha256 and says to run
    ``python -m data_prep verify DIR``, then prepare again. Exit status 2 (bad input)."""


def check_shards(dataset, key: str = "data.dir") -> None:
    """Raise :class:`ShardIntegrityError` (prefixed with ``key``) when a finished background hash of ``dataset``'s
    files (``ShardedTokens.verify_problem``) differs from the manifest; a no-op for datasets without one. Does not
    wait for hashes still running."""
    problem = getattr(dataset, "verify_problem", lambda: None)()
    if problem:
        raise ShardIntegrityError(f"{key}: {problem}")


def open_split(directory: str | Path, split: str, *, key: str = "data.dir", verify: bool = True):
    """``data_prep.shards.ShardedTokens(directory, split)`` (its ``manifest`` attribute holds manifest.json).

    Raises :class:`ConfigError` naming ``key`` (the config key or command-line flag that gave ``directory``) when the
    directory, its manifest or the split is missing, a shard file is missing or not of the manifest's size, or the
    split has no sequence; the message says how to prepare shards. The trainer and ``python -m pretrain.evaluate``
    both open splits here. With ``verify`` every shard and index file of the split is hashed in a background thread
    (see the module docstring; :func:`check_shards` reports a mismatch).
    """
    from data_prep.errors import DataPrepError
    from data_prep.shards import ShardedTokens

    prepare = f"run `python -m data_prep prepare ... --output {directory}` first"
    if not Path(directory).is_dir():
        raise ConfigError(f"{key}: {directory!r}: no such directory; {prepare}")
    if not (Path(directory) / "manifest.json").is_file():
        raise ConfigError(
            f"{key}: {directory!r} has no manifest.json (not a prepared shard directory, or its "
            f"preparation did not finish); {prepare}"
        )
    try:
        ds = ShardedTokens(directory, split)
    except DataPrepError as e:
        raise ConfigError(f"{key}: {directory!r}: no usable {split} split ({e}); {prepare}") from None
    if len(ds) == 0:
        raise ConfigError(
            f"{key}: {directory!r}: manifest.json has no sequences in split {split!r}; {prepare} (with "
            f"a held-out fraction, --valid-fraction, for a valid split)"
        )
    if verify:
        ds.start_verify()
    return ds


def collate(seqs: Sequence[np.ndarray], pad_id: int, multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad token sequences into a micro-batch.

    Args:
        seqs: 1-D integer arrays (token ids, special tokens included), lengths L_i >= 1.
        pad_id: the tokenizer's pad id.
        multiple: the padded length L is max(L_i) rounded up to a multiple of this.

    Returns:
        ``{"input_ids": int64 [B, L], "attention_mask": int64 [B, L]}`` (1 on real tokens, 0 on padding), CPU tensors.
    """
    longest = max(len(s) for s in seqs)
    length = -(-longest // multiple) * multiple
    ids = np.full((len(seqs), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


class DataOrder:
    """Deterministic epoch-reshuffled, rank-strided order of micro-batches (see the module docstring).

    Args:
        num_sequences: sequences in the split (N).
        micro_batch: sequences per micro-batch on one rank (B).
        world_size, rank: data-parallel layout.
        seed: the run's seed; epoch e's permutation comes from ``default_rng([seed, e])``.
        shuffle: false = sequences in stored order every epoch.

    Raises :class:`ConfigError` when N < B x world_size (not one global micro-batch).
    """

    def __init__(
        self, num_sequences: int, *, micro_batch: int, world_size: int, rank: int, seed: int, shuffle: bool = True
    ):
        self.n, self.micro, self.world, self.rank = int(num_sequences), int(micro_batch), int(world_size), int(rank)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.batches_per_epoch = self.n // (self.micro * self.world)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"data.dir: the train split has {self.n} sequences, fewer than one global micro-batch "
                f"({self.micro} x {self.world} ranks); prepare more data or lower "
                f"deepspeed.train_micro_batch_size_per_gpu"
            )
        self.epoch, self.batch = 0, 0
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order of sequence indices (int64 [N])."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            perm = (
                np.random.default_rng([self.seed, epoch]).permutation(self.n)
                if self.shuffle
                else np.arange(self.n, dtype=np.int64)
            )
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def indices(self, epoch: int, batch: int) -> np.ndarray:
        """Sequence indices of this rank's micro-batch ``batch`` of ``epoch`` (int64 [B])."""
        start = batch * self.micro * self.world
        return self.permutation(epoch)[start + self.rank : start + self.micro * self.world : self.world]

    def next(self) -> tuple[int, int]:
        """Advance the cursor; returns the (epoch, batch) handed out."""
        pos = (self.epoch, self.batch)
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return pos

    def state_dict(self) -> dict[str, Any]:
        """The cursor and the layout it belongs to (JSON-serialisable; the same on every rank)."""
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "num_sequences": self.n,
            "micro_batch": self.micro,
            "world_size": self.world,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any], *, allow_layout_change: bool = False) -> None:
        """Restore the cursor.

        With the same layout (world size, micro-batch) the position is exact. With another layout (only when
        ``allow_layout_change``) the cursor moves to the first micro-batch whose global start is at or after the
        sequences already consumed in the epoch (up to one global micro-batch is repeated or skipped).

        Raises :class:`ConfigError` when the split, seed or shuffle differ, or the layout differs and is not allowed.
        """
        if state["num_sequences"] != self.n:
            raise ConfigError(
                f"data.dir: the checkpoint was trained on a train split of {state['num_sequences']} "
                f"sequences, these shards have {self.n}; resume with the same shards"
            )
        if state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise ConfigError(
                f"train.seed / data.shuffle: the checkpoint used seed {state['seed']} shuffle "
                f"{state['shuffle']}, the config {self.seed} / {self.shuffle}; keep them for a resume"
            )
        same = state["world_size"] == self.world and state["micro_batch"] == self.micro
        if not same and not allow_layout_change:
            raise ConfigError(
                f"the checkpoint's data layout is {state['world_size']} ranks x micro-batch "
                f"{state['micro_batch']}, this run's {self.world} x {self.micro}; set "
                f"train.allow_world_size_change=true to resume anyway"
            )
        self.epoch = int(state["epoch"])
        if same:
            self.batch = int(state["batch"])
        else:
            consumed = int(state["batch"]) * state["micro_batch"] * state["world_size"]
            self.batch = -(-consumed // (self.micro * self.world))
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0


class BatchLoader:
    """Collated train micro-batches in :class:`DataOrder`, with background prefetch; an endless iterator.

    Args:
        dataset: ``ShardedTokens``-like: ``ds[i] -> 1-D int array``.
        order: the :class:`DataOrder` (its cursor is this loader's state).
        pad_id, multiple: see :func:`collate`.
        prefetch: micro-batches prepared ahead in one background thread (0 = read on demand).
        pin_memory: pin the batches (for asynchronous host-to-GPU copies).
        collate_fn: ``[dataset items] -> {name: tensor}`` (default: :func:`collate` of token arrays).

    ``next(loader)`` returns ``{"input_ids": int64 [B, L], "attention_mask": int64 [B, L]}`` (CPU tensors); it raises
    :class:`ShardIntegrityError` once a background hash of the dataset's files differs from the manifest
    (:func:`check_shards`).
    """

    def __init__(
        self,
        dataset,
        order: DataOrder,
        *,
        pad_id: int,
        multiple: int = 8,
        prefetch: int = 2,
        pin_memory: bool = False,
        collate_fn=None,
    ):
        self.dataset, self.order, self.pad_id, self.multiple = dataset, order, int(pad_id), int(multiple)
        self.collate_fn = collate_fn or (lambda items: collate(items, self.pad_id, self.multiple))
        self.prefetch, self.pin_memory = int(prefetch), pin_memory
        self._pool = concurrent.futures.ThreadPoolExecutor(1) if self.prefetch else None
        self._pending: collections.deque = collections.deque()  # (position, future) in order

    def _make(self, epoch: int, batch: int) -> dict[str, torch.Tensor]:
        out = self.collate_fn([self.dataset[int(i)] for i in self.order.indices(epoch, batch)])
        if self.pin_memory:
            out = {k: v.pin_memory() for k, v in out.items()}
        return out

    def _ahead(self, k: int) -> tuple[int, int]:
        """The cursor position ``k`` micro-batches ahead (without moving it)."""
        total = self.order.epoch * self.order.batches_per_epoch + self.order.batch + k
        return divmod(total, self.order.batches_per_epoch)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        check_shards(self.dataset)
        pos = self.order.next()
        if self._pool is None:
            return self._make(*pos)
        while self._pending and self._pending[0][0] != pos:
            self._pending.popleft()[1].cancel()
        if not self._pending:
            self._pending.append((pos, self._pool.submit(self._make, *pos)))
        have = {p for p, _ in self._pending}
        for k in range(self.prefetch):
            nxt = self._ahead(k)
            if nxt not in have:
                self._pending.append((nxt, self._pool.submit(self._make, *nxt)))
        return self._pending.popleft()[1].result()

    def state_dict(self) -> dict[str, Any]:
        """The cursor (:meth:`DataOrder.state_dict`)."""
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, Any], *, allow_layout_change: bool = False) -> None:
        """Restore the cursor and drop prefetched batches."""
        self.order.load_state_dict(state, allow_layout_change=allow_layout_change)
        while self._pending:
            self._pending.popleft()[1].cancel()

    def close(self) -> None:
        """Stop the prefetch thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def eval_batches(
    dataset, *, micro_batch: int, world_size: int, rank: int, max_sequences: int, pad_id: int, multiple: int = 8
):
    """This rank's evaluation micro-batches (a generator of collated batches, see :func:`collate`).

    The first ``max_sequences`` sequences of the split (0 = all), rank-strided; each rank gets ``n // world_size``
    sequences (the remainder is left out) in the same number of micro-batches (the last may be smaller), so that
    collectives inside the forward (ZeRO-3 gathers) stay matched across ranks. Yields nothing when the split has fewer
    sequences than ranks.
    """
    check_shards(dataset)
    n = len(dataset) if not max_sequences else min(len(dataset), int(max_sequences))
    per_rank = n // world_size
    idx = np.arange(rank, per_rank * world_size, world_size)
    for start in range(0, per_rank, micro_batch):
        yield collate([dataset[int(i)] for i in idx[start : start + micro_batch]], pad_id, multiple)
