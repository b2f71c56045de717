"""Invariants across ranks and layouts that the code cannot satisfy by accident (issue 23, item 2), asserted on the
data each rank really fed its module and against references computed here from the shard files.

Two runs of the same 3 steps, 2 sequences per step (micro-batch 1), tiny RoBERTa with dropout off:

- ``two_ranks``: a real ``deepspeed --num_gpus 2`` launch (2 ranks x 1 micro-batch) through ``tests/rank_probe.py``,
  which records per rank the loader's batches and the masker's output (``pretrain.recipes.PretrainRecipe.inputs``);
- ``one_rank``: the trainer in this process (1 rank x 2 micro-batches, gradient_accumulation_steps=2), its masker
  wrapped so that micro-batch m is masked as rank m of the 2-rank run masks it (the masking seed is (seed, step, rank,
  micro-step), so the layouts draw different masks by design; with this mapping both runs feed the module the same
  inputs, which the test checks before comparing losses).

With micro-batch 1 and 2 sequences per step both layouts read the same sequence in micro-batch m / rank m (the order
is a permutation cut into global micro-batches, rank-strided: pretrain/data.py). Dropout is off (a teacher whose
config has no dropout; the student inherits it) because each rank seeds its own dropout. ``data.pad_to_multiple_of``
48 pads the 64-token sequences to 96, so a token count that included padding would show.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from pretrain.config import load
from pretrain.masking import Masker
from tests.helpers import (
    REPO,
    assets,
    deepspeed_cmd,
    read_metrics,
    record_effect,
    run_cmd,
    tiny_overrides,
    train_in_process,
)
from tests.rank_probe import probe_file

TINY = REPO / "configs" / "tiny-cpu.json"
STEPS, PER_STEP, PAD_MULTIPLE = 3, 2, 48
SEED = json.loads(TINY.read_text())["train"]["seed"]  # the data order's and the masking's


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The tiny RoBERTa teacher of tests/helpers.assets with its dropout set to 0 (weights and tokenizer unchanged)."""
    path = tmp_path_factory.mktemp("teacher") / "roberta-nodropout"
    shutil.copytree(assets()["roberta"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def overrides(out, teacher) -> list[str]:
    return tiny_overrides(
        "roberta",
        out,
        steps=STEPS,
        **{
            "teacher.name_or_path": str(teacher),
            "deepspeed.train_batch_size": PER_STEP,
            "deepspeed.train_micro_batch_size_per_gpu": 1,
            "data.pad_to_multiple_of": PAD_MULTIPLE,
            "train.evaluate": False,
            "train.export_init": False,
            "train.save_interval": 100,
        },
    )


def shard_sequences(family: str = "roberta") -> tuple[list[np.ndarray], dict]:
    """The train split of the tiny ``family`` shards of tests/helpers.assets: (sequences as int64 arrays, the
    manifest)."""
    from data_prep.shards import ShardedTokens

    ds = ShardedTokens(assets()[f"shards-{family}"], "train")
    return [np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))], ds.manifest


@pytest.fixture(scope="module")
def shards():
    """:func:`shard_sequences` of the RoBERTa shards the runs read."""
    return shard_sequences()


def reference_ids(n: int, global_micro: int, *, size: int = PER_STEP, seed: int = SEED) -> np.ndarray:
    """Sequence ids of global micro-batch ``global_micro`` of ``size`` sequences (micro-batch x ranks) as
    pretrain/data.py documents the order: epoch e is ``default_rng([seed, e]).permutation(n)`` cut into runs of
    ``size`` (the tail that does not fill one is left out); rank r takes positions r, r + ranks, ... of a run."""
    epoch, batch = divmod(global_micro, n // size)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[batch * size : (batch + 1) * size]


def reference_counts(seqs: list[np.ndarray], vocab: int) -> np.ndarray:
    """Occurrences of every id in the train split, counted here from the shard files."""
    return np.bincount(np.concatenate(seqs), minlength=vocab)


def reference_log_probs(counts: np.ndarray, special: list[int], smoothing: float) -> torch.Tensor:
    """The selection log-probabilities frequency smoothing gives (XLM / DistilBERT): p ∝ max(count, 1) ** -smoothing,
    0 for special tokens, normalised."""
    p = np.maximum(counts.astype(np.float64), 1.0) ** -smoothing
    p[special] = 0.0
    with np.errstate(divide="ignore"):
        return torch.from_numpy(np.log(p / p.sum()).astype(np.float32))


@pytest.fixture(scope="module")
def two_ranks(teacher, tmp_path_factory):
    """The 2-rank launch; returns (run dir, {rank: the probe's record})."""
    out = tmp_path_factory.mktemp("two-ranks") / "run"
    cmd = deepspeed_cmd(TINY, overrides(out, teacher))
    cmd[cmd.index("launch/pretrain.py")] = "--module"
    cmd.insert(cmd.index("--module") + 1, "tests.rank_probe")
    r = run_cmd(cmd)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    return out, {rank: torch.load(probe_file(out, rank)) for rank in (0, 1)}


class MicroStepAsRank:
    """Wraps the trainer's masker: micro-batch m of a step is masked as rank m masks its micro-batch 0 (see the
    module docstring); records each call's batch and output as tests/rank_probe.py does."""

    def __init__(self, masker: Masker):
        self.masker = masker
        self.micro_batches: list[dict] = []

    def __call__(self, ids, mask, *, step: int, rank: int, micro_step: int):
        assert rank == 0
        masked, labels = self.masker(ids, mask, step=step, rank=micro_step, micro_step=0)
        self.micro_batches.append(
            {"step": step, "micro_step": micro_step, "input_ids": ids.clone(), "masked": masked, "labels": labels}
        )
        return masked, labels


@pytest.fixture(scope="module")
def one_rank(teacher, tmp_path_factory):
    """The 1-rank in-process run; returns (run dir, the masker the trainer built, the wrapper's records)."""
    out = tmp_path_factory.mktemp("one-rank") / "run"
    seen = {}

    def wrap(trainer):
        assert trainer.plan.accumulation == 2 and trainer.world_size == 1
        seen["masker"] = trainer.recipe.masker
        seen["wrapper"] = trainer.recipe.masker = MicroStepAsRank(trainer.recipe.masker)

    train_in_process(load(TINY, overrides(out, teacher)), before_fit=wrap)
    return out, seen["masker"], seen["wrapper"].micro_batches


def _batches(record) -> dict[tuple[int, int], dict]:
    return {(mb["step"], mb["micro_step"]): mb for mb in record["micro_batches"]}


def test_each_rank_reads_its_own_sequences(two_ranks, shards):
    """Rank r's micro-batch of step s is sequence ``reference_ids(n, s)[r]`` of the shards (token for token, its
    attention mask the sequence's length), and the ranks' sequences differ."""
    _, records = two_ranks
    seqs, _ = shards
    for rank, record in records.items():
        got = _batches(record)
        assert sorted(got) == [(s, 0) for s in range(STEPS)]
        for s in range(STEPS):
            want = seqs[reference_ids(len(seqs), s)[rank]]
            ids, mask = got[s, 0]["input_ids"], got[s, 0]["attention_mask"]
            assert ids.shape == (1, -(-len(want) // PAD_MULTIPLE) * PAD_MULTIPLE)
            assert int(mask.sum()) == len(want) and torch.equal(ids[0, : len(want)], torch.from_numpy(want))
    for s in range(STEPS):
        a, b = (seqs[i] for i in reference_ids(len(seqs), s))
        assert not np.array_equal(a, b)  # the reference itself tells the ranks apart
        assert not torch.equal(records[0]["micro_batches"][s]["input_ids"], records[1]["micro_batches"][s]["input_ids"])


def test_each_rank_draws_its_own_masks(two_ranks, shards, teacher):
    """Rank r's masked ids and labels of step s are those of the masking stream (seed, s, r, 0), not rank 0's
    stream: recomputed here with a masker of the shards' counts on the recorded batch."""
    from transformers import AutoTokenizer

    from pretrain.masking import MaskingConfig

    _, records = two_ranks
    seqs, manifest = shards
    counts = reference_counts(seqs, manifest["tokenizer"]["vocab_size"])
    masker = Masker.from_tokenizer(
        MaskingConfig(), AutoTokenizer.from_pretrained(teacher), token_counts=counts, seed=SEED
    )
    for rank, record in records.items():
        for s, mb in enumerate(record["micro_batches"]):
            labels = mb["labels"]
            assert (labels != -100).any()
            assert torch.equal(labels[labels != -100], mb["input_ids"][labels != -100])
            masked, want = masker(mb["input_ids"], mb["attention_mask"], step=s, rank=rank, micro_step=0)
            assert torch.equal(mb["masked"], masked) and torch.equal(labels, want), (rank, s)
            if rank:
                other, _ = masker(mb["input_ids"], mb["attention_mask"], step=s, rank=0, micro_step=0)
                assert not torch.equal(mb["masked"], other)  # the streams differ on this very batch


def test_the_masker_of_a_real_run_has_the_shards_token_counts(two_ranks, one_rank, shards):
    """Frequency smoothing is on (masking.mlm_smoothing 0.7) in both runs: each rank's masker selects with the
    log-probabilities of the train split's token counts, counted here from the shard files (which
    token_counts.npy holds too), not the uniform ones of a masker given no counts."""
    from data_prep.shards import load_token_counts

    seqs, manifest = shards
    counts = reference_counts(seqs, manifest["tokenizer"]["vocab_size"])
    assert np.array_equal(load_token_counts(assets()["shards-roberta"]), counts)
    special = manifest["tokenizer"]["all_special_ids"]
    want = reference_log_probs(counts, special, 0.7)
    assert not torch.allclose(want, reference_log_probs(counts, special, 0.0))  # the counts matter
    tables = [two_ranks[1][r]["masker_log_probs"] for r in (0, 1)] + [one_rank[1]._cpu["log_probs"]]
    for got in tables:
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)  # float32 rounding of the same float64 values


def micro_batch_counts(seqs: list[np.ndarray], ids, special: list[int]) -> tuple[int, int]:
    """(tokens, masked tokens) of one micro-batch of the sequences ``ids``: every token of each sequence (no
    padding); masked: ceil(0.15 x the micro-batch's non-special tokens) (pretrain/masking.py, token masking)."""
    batch = [seqs[i] for i in ids]
    real = sum(int(np.isin(s, special, invert=True).sum()) for s in batch)
    return sum(len(s) for s in batch), math.ceil(0.15 * real - 1e-6)


def test_one_rank_two_micro_batches_logs_what_two_ranks_log(two_ranks, one_rank, shards):
    """1 rank x 2 micro-batches and 2 ranks x 1 fed the module the same inputs (checked first), so every step logs
    the same losses and token counts, and those counts are the ones counted here from the shards.

    Error budget of the losses: step 1 runs the same fp32 forward on the same weights and inputs, so each
    micro-batch's loss is bit-identical; the layouts only sum the two in another order and precision (fp32 on one
    rank, fp64 over ranks): <= 2 ulp of fp32, 2.4e-7 relative. Later steps add the gradient's summation order (fp32
    accumulation vs. the ranks' all-reduce, about 1e-7 relative) through two AdamW steps at lr <= 5e-4, which move
    the losses by about 1e-7 of their scale. A term far below the loss's scale (the KL of a student still next to its
    teacher: 2e-5 of a loss near 10) moves by that absolute amount, not by 1e-7 of itself: under
    ATEN_CPU_CAPABILITY=default its step-3 value differed by 1.2e-3 relative, 2.6e-8 absolute. Tolerance: step 1,
    1e-6 relative; later steps, 1e-6 relative or 1e-6 of the step's loss, whichever is larger. A loss normalised by the
    wrong world size is off by a factor 2."""
    seqs, manifest = shards
    special = manifest["tokenizer"]["all_special_ids"]
    two_dir, records = two_ranks
    one_dir, _, one_batches = one_rank
    ranks = {r: _batches(records[r]) for r in (0, 1)}
    assert len(one_batches) == STEPS * 2
    for mb in one_batches:
        theirs = ranks[mb["micro_step"]][mb["step"], 0]
        for key in ("input_ids", "masked", "labels"):
            assert torch.equal(mb[key], theirs[key]), (mb["step"], mb["micro_step"], key)
    one, two = read_metrics(one_dir), read_metrics(two_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    tokens = masked = 0
    worst = 0.0
    for s, (a, b) in enumerate(zip(one, two, strict=True)):
        for rank in (0, 1):  # each rank's micro-batch is masked on its own: the count is per micro-batch
            t, m = micro_batch_counts(seqs, reference_ids(len(seqs), s)[rank : rank + 1], special)
            tokens, masked = tokens + t, masked + m
        assert a["tokens_seen"] == b["tokens_seen"] == tokens, (s, a["tokens_seen"], b["tokens_seen"], tokens)
        assert a["masked_tokens_seen"] == b["masked_tokens_seen"] == masked
        keys = {k for k in a if k.startswith("loss") and k != "loss_scale"}
        assert keys == {k for k in b if k.startswith("loss") and k != "loss_scale"} >= {"loss", "loss_ce"}
        floor = 0.0 if s == 0 else 1e-6 * abs(b["loss"])  # step 1: the same weights (see the budget above)
        for k in keys:
            worst = max(worst, abs(a[k] - b[k]) / max(1e-6 * abs(b[k]), floor))
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=floor), (s + 1, k, a[k], b[k])
    record_effect("1x2 vs 2x1 loss: largest difference / its tolerance", worst, 1.0, "tolerance share <=")
