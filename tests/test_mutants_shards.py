"""data_prep/shards.py, the shard writer and reader, in-process against raw numpy (mutation testing, docs/testing.md
"Mutation testing"): the bytes and offsets the writer leaves, shard boundaries, resume (truncation, a renamed shard,
stale later shards), the reader's items, lengths and documents read in several blocks, pickling, the background
hasher and verify."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
from concurrent.futures import Future
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import pytest

from data_prep import shards
from data_prep.errors import DataPrepError
from data_prep.shards import ShardedTokens, ShardWriter

CLS, SEP = 1, 2


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_manifest(directory: Path, dtype, splits: dict[str, list[dict]], vocab_size: int = 1000) -> dict:
    manifest = {
        "format_version": shards.FORMAT_VERSION,
        "dtype": np.dtype(dtype).name,
        "tokenizer": {"sep_token_id": SEP, "vocab_size": vocab_size},
        "splits": {s: shards.split_summary(records, 0) for s, records in splits.items()},
    }
    (directory / shards.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def _sequences(seed: int, n: int, length: int, low: int = 3, high: int = 60000) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=(n, length))


def test_writer_bytes_offsets_and_records(tmp_path):
    """Rows of 5 tokens into shards of 12: a shard closes at the first sequence boundary at or past 12 tokens (15),
    each .bin holds exactly its rows' little-endian bytes, each index the cumulative offsets from 0."""
    rows = _sequences(0, 7, 5)
    w = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 12)
    w.write(rows[:2])
    w.write(rows[2])  # a 1-D row
    w.write(rows[3:])
    records = w.close()
    assert [r["num_sequences"] for r in records] == [3, 3, 1]
    for k, (record, part) in enumerate(zip(records, (rows[0:3], rows[3:6], rows[6:7]), strict=True)):
        tokens, index = shards.shard_files("train", k)
        assert record["file"] == tokens and record["index_file"] == index
        data = (tmp_path / tokens).read_bytes()
        assert data == part.astype("<u2").tobytes()
        idx = np.load(tmp_path / index)
        assert idx.dtype == np.int64
        assert idx.tolist() == list(range(0, 5 * len(part) + 1, 5))
        assert record["num_tokens"] == 5 * len(part)
        assert record["bytes"] == 10 * len(part) == len(data)
        assert record["sha256"] == _sha(tmp_path / tokens)
        assert record["index_sha256"] == _sha(tmp_path / index)
        assert record["index_bytes"] == (tmp_path / index).stat().st_size
    assert not list(tmp_path.glob("*.partial"))
    assert w.k == 3


def test_writer_exact_fill_and_uint32(tmp_path):
    """A shard that reaches shard_tokens exactly closes there; close() with nothing pending adds no empty shard."""
    rows = _sequences(1, 4, 6, high=2**20)
    w = ShardWriter(tmp_path, "valid", np.dtype(np.uint32), 12)
    w.write(rows)
    assert w.close() == w.done
    assert [r["num_sequences"] for r in w.done] == [2, 2]
    assert (tmp_path / "valid-00001.bin").read_bytes() == rows[2:].astype("<u4").tobytes()
    assert [r["bytes"] for r in w.done] == [48, 48]


def test_state_resume_truncates_and_continues_byte_identically(tmp_path):
    """Writing after a resume from an earlier state gives the files of an uninterrupted run: the partial file is cut
    back to the state's length, a shard renamed after the state becomes partial again, later shards' files go."""
    rows = _sequences(2, 9, 4)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    ref = ShardWriter(ref_dir, "train", np.dtype(np.uint16), 10)
    ref.write(rows)
    ref_records = ref.close()

    w = ShardWriter(run_dir, "train", np.dtype(np.uint16), 10)
    w.write(rows[:4])  # shard 0 done (3 rows, 12 tokens), 1 row in shard 1
    w.sync()
    state, offsets = w.state()
    state = json.loads(json.dumps(state))
    assert state["tokens"] == 4 and offsets.tolist() == [0, 4]
    assert w.finished_since_checkpoint is False
    w.write(rows[4:8])  # shard 1 done and renamed, shard 2 started
    assert w.finished_since_checkpoint is True
    w.sync()
    w.abandon()
    assert (run_dir / "train-00001.bin").exists() and (run_dir / "train-00002.bin.partial").exists()
    (run_dir / "train-00005.bin").write_bytes(b"stale")  # a later shard's stale file
    (run_dir / "valid-00009.bin").write_bytes(b"other split")

    w2 = ShardWriter(run_dir, "train", np.dtype(np.uint16), 10)
    w2.resume(state, offsets)
    assert (run_dir / "train-00001.bin.partial").stat().st_size == 8
    assert not (run_dir / "train-00001.bin").exists() and not (run_dir / "train-00001.idx.npy").exists()
    assert not (run_dir / "train-00002.bin.partial").exists() and not (run_dir / "train-00005.bin").exists()
    assert (run_dir / "valid-00009.bin").exists()
    w2.write(rows[4:])
    assert w2.close() == ref_records
    for name in sorted(p.name for p in ref_dir.iterdir()):
        assert (run_dir / name).read_bytes() == (ref_dir / name).read_bytes(), name


def test_resume_at_a_shard_boundary_and_a_short_partial(tmp_path):
    rows = _sequences(3, 6, 5)
    w = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 10)
    w.write(rows[:2])  # exactly one full shard
    state, offsets = w.state()
    assert state["tokens"] == 0 and offsets.tolist() == [0]
    w2 = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 10)
    w2.resume(state, offsets)
    assert w2.k == 1 and (tmp_path / "train-00000.bin").exists()
    w2.write(rows[2:])
    assert [r["num_sequences"] for r in w2.close()] == [2, 2, 2]

    short = tmp_path / "short"
    short.mkdir()
    (short / "train-00000.bin.partial").write_bytes(b"\0" * 6)
    with pytest.raises(DataPrepError, match="expected at least 10 bytes"):
        ShardWriter(short, "train", np.dtype(np.uint16), 100).resume({"done": [], "tokens": 5}, np.array([0, 5]))


def _records(directory: Path, split: str, lengths_per_shard: list[list[int]], dtype, rng) -> tuple[list, list]:
    """Shards of ``split`` from random sequences of the given lengths; returns (manifest records, the sequences)."""
    seqs = []
    records = []
    for k, lengths in enumerate(lengths_per_shard):
        parts = [rng.integers(3, 500, size=n).astype(dtype) for n in lengths]
        seqs += parts
        tokens, index = shards.shard_files(split, k)
        (directory / tokens).write_bytes(np.concatenate(parts).astype(dtype).tobytes())
        np.save(directory / index, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        records.append(
            {
                "file": tokens,
                "num_sequences": len(lengths),
                "num_tokens": int(sum(lengths)),
                "bytes": int(sum(lengths)) * np.dtype(dtype).itemsize,
                "sha256": _sha(directory / tokens),
                "index_file": index,
                "index_bytes": (directory / index).stat().st_size,
                "index_sha256": _sha(directory / index),
            }
        )
    return records, seqs


def _prepared(tmp_path: Path, lengths_per_shard: list[list[int]], dtype=np.uint16, seed: int = 0):
    """A train split from explicit sequences; returns (directory, the list of sequences)."""
    records, seqs = _records(tmp_path, "train", lengths_per_shard, dtype, np.random.default_rng(seed))
    _write_manifest(tmp_path, dtype, {"train": records})
    return tmp_path, seqs


def test_reader_items_lengths_and_negative_indices(tmp_path):
    directory, seqs = _prepared(tmp_path, [[3, 5, 2], [4], [6, 1]])
    ds = ShardedTokens(directory, "train")
    assert len(ds) == 6
    for i, s in enumerate(seqs):
        got = ds[i]
        assert got.dtype == np.uint16 and got.tolist() == s.tolist()
        assert ds[i - 6].tolist() == s.tolist()
    got = ds[4]
    got[0] = 0  # a copy
    assert ds[4].tolist() == seqs[4].tolist()
    for bad in (6, -7):
        with pytest.raises(IndexError):
            ds[bad]
    assert ds.lengths.dtype == np.int64 and ds.lengths.tolist() == [3, 5, 2, 4, 6, 1]
    clone = pickle.loads(pickle.dumps(ds))
    assert [clone[i].tolist() for i in range(6)] == [s.tolist() for s in seqs]
    with pytest.raises(DataPrepError, match="no split 'valid'"):
        ShardedTokens(directory, "valid")


def test_reader_refuses_a_shard_of_another_size_and_a_bad_index(tmp_path):
    directory, _ = _prepared(tmp_path, [[3, 5]])
    with open(directory / "train-00000.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataPrepError, match="missing or not 16 bytes"):
        ShardedTokens(directory, "train")
    (tmp_path / "b").mkdir()
    directory2, _ = _prepared(tmp_path / "b", [[3, 5]])
    np.save(directory2 / "train-00000.idx.npy", np.array([0, 3, 5, 8], dtype=np.int64))
    with pytest.raises(DataPrepError, match="index shape"):
        ShardedTokens(directory2, "train")[0]


def _packed(tmp_path: Path, docs: list[np.ndarray], max_len: int, shard_sequences: int):
    """FULL-SENTENCES packing by hand: the stream doc1 SEP doc2 SEP ... cut into chunks of max_len - 2, each stored
    as CLS chunk SEP, shard_sequences sequences per shard."""
    stream = np.concatenate([np.append(d, SEP) for d in docs])
    chunks = [stream[i : i + max_len - 2] for i in range(0, len(stream), max_len - 2)]
    seqs = [np.concatenate([[CLS], c, [SEP]]) for c in chunks]
    lengths = [[len(s) for s in seqs[k : k + shard_sequences]] for k in range(0, len(seqs), shard_sequences)]
    directory, _ = _prepared(tmp_path, lengths)
    # overwrite with the packed contents, same lengths
    records = []
    for k in range(len(lengths)):
        part = seqs[k * shard_sequences : (k + 1) * shard_sequences]
        tokens = shards.shard_files("train", k)[0]
        (directory / tokens).write_bytes(np.concatenate(part).astype(np.uint16).tobytes())
        records.append(json.loads((directory / shards.MANIFEST).read_text())["splits"]["train"]["shards"][k])
        records[-1]["sha256"] = _sha(directory / tokens)
    _write_manifest(directory, np.uint16, {"train": records})
    return directory


@pytest.mark.parametrize("block", [1, 2, 3, 5, 4096])
def test_documents_in_several_blocks_and_shards(tmp_path, block):
    """60 documents of 1..12 tokens packed in sequences of 8 over shards of 7 sequences: read in blocks of 1, 2, 3,
    5 sequences (documents spanning blocks and shards) or one block, documents() gives them back exactly."""
    rng = np.random.default_rng(7)
    docs = [rng.integers(3, 500, size=int(rng.integers(1, 13))) for _ in range(60)]
    directory = _packed(tmp_path, docs, max_len=8, shard_sequences=7)
    got = list(ShardedTokens(directory, "train").documents(block_sequences=block))
    assert len(got) == 60
    for g, d in zip(got, docs, strict=True):
        assert g.tolist() == d.tolist()


def test_documents_carry_without_final_separator(tmp_path):
    """A stream whose last document has no SEP (a split cut mid-document) yields that rest as the last document."""
    directory, _ = _prepared(tmp_path, [[5, 4]])
    (directory / "train-00000.bin").write_bytes(np.array([CLS, 7, SEP, 8, SEP, CLS, 9, 10, SEP], np.uint16).tobytes())
    records = json.loads((directory / shards.MANIFEST).read_text())["splits"]["train"]["shards"]
    records[0]["sha256"] = _sha(directory / "train-00000.bin")
    _write_manifest(directory, np.uint16, {"train": records})
    got = [d.tolist() for d in ShardedTokens(directory, "train").documents(block_sequences=1)]
    assert got == [[7], [8, 9, 10]]


def test_background_hash_and_verify_problem(tmp_path):
    directory, _ = _prepared(tmp_path, [[3, 5], [2]])
    ds = ShardedTokens(directory, "train")
    assert ds.verify_problem() is None  # nothing started
    ds.start_verify()
    assert len(ds._hashes) == 4
    for _, _, fut in ds._hashes:
        fut.result(timeout=60)
    assert ds.verify_problem() is None
    assert ds._hashes == []  # finished and good: checked once

    bad = tmp_path / "bad"
    bad.mkdir()
    directory, _ = _prepared(bad, [[3, 5], [2]])
    data = bytearray((directory / "train-00001.bin").read_bytes())
    data[0] ^= 1
    (directory / "train-00001.bin").write_bytes(bytes(data))
    ds = ShardedTokens(directory, "train")
    ds.start_verify()
    for _, _, fut in ds._hashes:
        fut.result(timeout=60)
    problem = ds.verify_problem()
    assert problem is not None and "train-00001.bin" in problem
    assert ds.verify_problem() == problem  # reported again
    # the bad file stays for the next report, the files after it are not looked at once a problem is found
    assert [p.name for p, _, _ in ds._hashes] == ["train-00001.bin", "train-00001.idx.npy"]


def test_hasher_hashes_each_file_version_once(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    a, b = shards.HASHER.submit(path), shards.HASHER.submit(path)
    assert a is b and a.result(timeout=60) == hashlib.sha256(b"abc").hexdigest()
    path.write_bytes(b"abcd")
    c = shards.HASHER.submit(path)
    assert c is not a and c.result(timeout=60) == hashlib.sha256(b"abcd").hexdigest()


def test_verify_totals_and_problems(tmp_path):
    directory, _ = _prepared(tmp_path, [[3, 5], [2]])
    problems, totals = shards.verify(directory)
    assert problems == []
    assert totals == {
        "shards": 2,
        "sequences": 3,
        "tokens": 10,
        "bytes": 16 + 4 + sum((directory / f).stat().st_size for f in ("train-00000.idx.npy", "train-00001.idx.npy")),
    }
    np.save(directory / "train-00001.idx.npy", np.array([0, 1], dtype=np.int64))
    problems, _ = shards.verify(directory)
    assert len(problems) == 1 and "train-00001.idx.npy" in problems[0]


# ---- the tests below kill the mutants the tests above leave alive (docs/mutants-shards.md) ----


def test_atomic_save_npy_never_pickles(tmp_path):
    """An int array round-trips; an object array is refused (np.save would pickle it) and leaves no file behind."""
    path = tmp_path / "a.npy"
    shards.atomic_save_npy(path, np.arange(5, dtype=np.int64))
    assert np.load(path).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="allow_pickle"):
        shards.atomic_save_npy(tmp_path / "b.npy", np.array([1, {}], dtype=object))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


def test_load_manifest_reads_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """manifest.json is UTF-8 (json.dumps of a non-ASCII tokenizer name, say); it reads back the same where the
    locale's encoding is not UTF-8 (simulated: ``open`` without an encoding decodes Latin-1 here, as on a
    POSIX locale like en_US.ISO-8859-1 or a Windows code page)."""
    manifest = _write_manifest(tmp_path, np.uint16, {"train": []})
    manifest["tokenizer"]["name"] = "bert-base-german-cased-äöü"
    (tmp_path / shards.MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")

    def open_in_latin1_locale(file: Path, mode: str = "r", encoding: str | None = None) -> IO[Any]:
        return builtins.open(file, mode, encoding=encoding or "latin-1")

    monkeypatch.setattr(shards, "open", open_in_latin1_locale, raising=False)
    assert shards.load_manifest(tmp_path)["tokenizer"]["name"] == "bert-base-german-cased-äöü"


def test_load_token_counts(tmp_path):
    """int64 whatever dtype the file has; a missing file is a DataPrepError naming it; a pickled file is refused."""
    with pytest.raises(DataPrepError, match=r"token_counts\.npy: not found"):
        shards.load_token_counts(tmp_path)
    np.save(tmp_path / shards.TOKEN_COUNTS, np.array([3, 0, 70000], dtype=np.int32))
    counts = shards.load_token_counts(str(tmp_path))
    assert counts.dtype == np.int64 and counts.tolist() == [3, 0, 70000]
    np.save(tmp_path / shards.TOKEN_COUNTS, np.array([3, 0, 5], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        shards.load_token_counts(tmp_path)


class _StopHasher:
    """A queue item that ends a hasher's thread: opening it raises SystemExit (not an OSError, so it leaves _run;
    threading ignores it, pytest reports it as a warning, filtered where it is expected)."""

    def __fspath__(self) -> str:
        raise SystemExit


def _stop_thread(h: shards._BackgroundHasher) -> None:
    """End ``h``'s thread (the next submit starts another), so that no thread of this test outlives it (a
    non-daemon one would keep pytest from exiting)."""
    if h._thread is not None and h._thread.is_alive():
        h._queue.put((cast(Path, _StopHasher()), Future()))
        h._thread.join(timeout=10)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_background_hasher_one_daemon_thread_and_file_versions(tmp_path):
    """A fresh hasher: files of equal size and mtime are told apart by path; one named daemon thread serves every
    file; a thread that is gone (a forked DataLoader worker inherits the object, not the thread) is replaced; an
    unreadable path's future holds the OSError."""
    h = shards._BackgroundHasher()
    try:
        a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
        a.write_bytes(b"same size 1")
        b.write_bytes(b"same size 2")
        c.write_bytes(b"c")
        os.utime(b, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns))
        fa, fb = h.submit(a), h.submit(b)
        assert fa is not fb
        assert fa.result(timeout=10) == hashlib.sha256(b"same size 1").hexdigest()
        assert fb.result(timeout=10) == hashlib.sha256(b"same size 2").hexdigest()
        thread = h._thread
        assert thread is not None and thread.name == "shard-sha256" and thread.daemon is True
        assert h.submit(c).result(timeout=10) == hashlib.sha256(b"c").hexdigest()
        assert h._thread is thread and thread.is_alive()

        _stop_thread(h)
        assert not thread.is_alive()
        c.write_bytes(b"c2")
        os.utime(c, ns=(0, 10**18))
        assert h.submit(c).result(timeout=10) == hashlib.sha256(b"c2").hexdigest()
        assert h._thread is not thread and h._thread.is_alive()
        with pytest.raises(IsADirectoryError):
            h.submit(tmp_path).result(timeout=10)
    finally:
        _stop_thread(h)
        _stop_thread(shards.HASHER)  # the module's hasher, started by the tests above


def test_verify_problem_skips_pending_hashes_and_names_unreadable_files(tmp_path):
    """verify_problem with hand-made futures: a hash still running is kept for later and the files after it are
    still checked; an unreadable file is reported as such."""
    directory, _ = _prepared(tmp_path, [[3, 5], [2]])
    ds = ShardedTokens(directory, "train")
    p0, p1, p2 = (directory / n for n in ("train-00000.bin", "train-00001.bin", "train-00001.idx.npy"))
    pending: Future[str] = Future()
    bad: Future[str] = Future()
    unreadable: Future[str] = Future()
    bad.set_result("0" * 64)
    unreadable.set_exception(PermissionError(13, "Permission denied"))
    ds._hashes = [(p0, "a" * 64, pending), (p1, "b" * 64, bad)]
    assert ds.verify_problem() == (
        f"{p1}: sha256 {'0' * 64} does not match the manifest's {'b' * 64} (the file changed since prepare wrote "
        f"it); run `python -m data_prep verify {directory}`, then prepare the data again (python -m data_prep "
        "prepare ... --overwrite)"
    )
    assert [p for p, _, _ in ds._hashes] == [p0, p1]
    pending.set_result("a" * 64)
    assert ds.verify_problem() is not None
    assert [p for p, _, _ in ds._hashes] == [p1]
    ds._hashes = [(p2, "c" * 64, unreadable)]
    problem = ds.verify_problem()
    assert problem is not None and problem.startswith(f"{p2}: sha256 unreadable ([Errno 13] Permission denied)")


def test_reader_maps_each_file_once_read_only(tmp_path):
    """The default split is train; each shard's index and tokens are memory-mapped read-only, once: reads go on
    from the maps after the files are unlinked. An index past the end names the count, directory and split."""
    directory, seqs = _prepared(tmp_path, [[3, 5], [2]])
    ds = ShardedTokens(directory)
    assert ds.split == "train" and len(ds) == 3
    assert ds[0].tolist() == seqs[0].tolist()
    assert isinstance(ds._idx(0), np.memmap)
    assert not ds._tok(0).flags.writeable
    (directory / "train-00000.bin").unlink()
    (directory / "train-00000.idx.npy").unlink()
    assert ds[1].tolist() == seqs[1].tolist()
    with pytest.raises(IndexError, match=rf"^sequence 3 out of range for 3 sequences \({directory}, train\)$"):
        ds[3]


def test_pickled_reader_carries_no_data_and_no_futures(tmp_path):
    """After reads and start_verify, a pickled reader (what a DataLoader worker receives) holds neither the maps'
    data (3,000 sequences: 12 kB of tokens, 24 kB of index) nor the hash futures; the copy reads and verifies."""
    directory, seqs = _prepared(tmp_path, [[2] * 3000])
    ds = ShardedTokens(directory)
    assert ds[2999].tolist() == seqs[2999].tolist()
    ds.start_verify()
    data = pickle.dumps(ds)
    assert len(data) < 4000
    clone = pickle.loads(data)
    assert clone._index == [None] and clone._tokens == [None] and clone._hashes == []
    assert clone.verify_problem() is None
    assert clone[2999].tolist() == seqs[2999].tolist()
    for _, _, fut in ds._hashes:
        fut.result(timeout=10)
    assert ds.verify_problem() is None


def test_writer_takes_only_the_rows_a_started_shard_needs(tmp_path):
    """Shards of 12 tokens, rows of 5: after 2 rows (10 tokens) a batch of 3 puts 1 more row in shard 0 (15 tokens)
    and 2 in shard 1."""
    rows = _sequences(4, 5, 5)
    w = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 12)
    assert w.finished_since_checkpoint is False
    w.write(rows[:2])
    w.write(rows[2:])
    assert [r["num_sequences"] for r in w.close()] == [3, 2]
    assert (tmp_path / "train-00000.bin").read_bytes() == rows[:3].astype("<u2").tobytes()


class _CountingFile:
    """A file whose writes are recorded (their sizes)."""

    def __init__(self, f):
        self.f = f
        self.writes: list[int] = []

    def write(self, data: bytes) -> int:
        self.writes.append(len(data))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_writer_writes_a_shards_rows_in_one_call(tmp_path, monkeypatch):
    """A batch of 300 rows of 4 tokens into shards of 1,000: shard 0's 250 rows go to the file in one write (a real
    batch of 65k sequences is not written row by row), the rest to shard 1."""
    rows = _sequences(5, 300, 4)
    w = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 1000)
    spy = _CountingFile(w._open())  # the partial file the writer opened, closed when shard 0 is finished
    monkeypatch.setattr(w, "_file", spy)
    w.write(rows)
    assert spy.writes == [250 * 4 * 2]
    assert [r["num_sequences"] for r in w.close()] == [250, 50]
    assert (tmp_path / "train-00000.bin").read_bytes() == rows[:250].astype("<u2").tobytes()


def test_resume_from_a_partial_of_exactly_the_state_length(tmp_path):
    """The usual resume: the partial file synced at state() is exactly as long as the state says; offsets given in
    another integer dtype still give an int64 index. abandon() twice, or on a writer that never opened a file,
    does nothing."""
    rows = _sequences(6, 3, 4)
    ShardWriter(tmp_path, "train", np.dtype(np.uint16), 100).abandon()
    w = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 100)
    w.write(rows)
    w.sync()
    state, offsets = w.state()
    w.abandon()
    w.abandon()
    assert (tmp_path / "train-00000.bin.partial").stat().st_size == 24
    w2 = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 100)
    w2.resume(json.loads(json.dumps(state)), offsets.astype(np.int32))
    (record,) = w2.close()
    assert record["num_sequences"] == 3 and record["bytes"] == 24
    idx = np.load(tmp_path / "train-00000.idx.npy")
    assert idx.dtype == np.int64 and idx.tolist() == [0, 4, 8, 12]
    assert (tmp_path / "train-00000.bin").read_bytes() == rows.astype("<u2").tobytes()


def _edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / shards.MANIFEST).read_text())
    edit(manifest)
    (directory / shards.MANIFEST).write_text(json.dumps(manifest))


def _set_token_counts(directory: Path, counts: np.ndarray, allow_pickle: bool = False) -> None:
    """Write token_counts.npy and name it in the manifest with its true size and sha256."""
    path = directory / shards.TOKEN_COUNTS
    np.save(path, counts, allow_pickle=allow_pickle)
    entry = {"file": shards.TOKEN_COUNTS, "bytes": path.stat().st_size, "sha256": _sha(path)}
    _edit_manifest(directory, lambda m: m.update(token_counts=entry))


def _two_splits(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """train (shards of 3+5 and 2 tokens) and valid (one shard of 4+1+6), uint16, with the train split's token counts
    (vocab_size 1000); returns (directory, the counts)."""
    rng = np.random.default_rng(9)
    train, train_seqs = _records(tmp_path, "train", [[3, 5], [2]], np.uint16, rng)
    valid, _ = _records(tmp_path, "valid", [[4, 1, 6]], np.uint16, rng)
    _write_manifest(tmp_path, np.uint16, {"train": train, "valid": valid})
    counts = np.bincount(np.concatenate(train_seqs), minlength=1000).astype(np.int64)
    _set_token_counts(tmp_path, counts)
    return tmp_path, counts


def test_verify_two_splits_with_token_counts(tmp_path):
    """Totals add up over both splits; the token counts file is checked (its bytes counted); nothing is wrong."""
    directory, _ = _two_splits(tmp_path)
    problems, totals = shards.verify(directory)
    assert problems == []
    assert totals == {
        "shards": 3,
        "sequences": 3 + 3,
        "tokens": 10 + 11,
        "bytes": 2 * 21 + sum(p.stat().st_size for p in directory.glob("*.idx.npy")) + 128 + 8 * 1000,
    }


@pytest.mark.parametrize("bad", ["sum", "shape"])
def test_verify_token_counts_of_the_wrong_sum_or_shape(tmp_path, bad):
    """Counts whose file matches the manifest but that sum to one more than the train tokens, or have 999 entries:
    exactly one problem line giving the file, shape, sum, vocab_size and train tokens."""
    directory, counts = _two_splits(tmp_path)
    counts = counts.copy()
    if bad == "sum":
        counts[5] += 1
    else:
        counts = np.concatenate([counts[:998], [counts[998:].sum()]])
    _set_token_counts(directory, counts)
    problems, _ = shards.verify(directory)
    shape = "(1000,)" if bad == "sum" else "(999,)"
    assert problems == [
        f"{directory / 'token_counts.npy'}: shape {shape} / sum {10 + (bad == 'sum')} does not match vocab_size 1000 "
        "/ train tokens 10"
    ]


def test_verify_token_counts_without_a_train_split(tmp_path):
    """A valid-only directory: its token counts (all zero) match 0 train tokens."""
    valid, _ = _records(tmp_path, "valid", [[4, 1]], np.uint16, np.random.default_rng(1))
    _write_manifest(tmp_path, np.uint16, {"valid": valid})
    _set_token_counts(tmp_path, np.zeros(1000, np.int64))
    assert shards.verify(tmp_path)[0] == []


def test_verify_never_unpickles(tmp_path):
    """An index or token counts file that is a pickle (object array) is refused by np.load even when the manifest
    names it with its sha256: verify raises instead of running pickle code."""
    directory, _ = _two_splits(tmp_path)
    _set_token_counts(directory, np.zeros(1000, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        shards.verify(directory)
    (tmp_path / "b").mkdir()
    directory, _ = _two_splits(tmp_path / "b")
    index = directory / "train-00001.idx.npy"
    np.save(index, np.array([0, 2], dtype=object), allow_pickle=True)
    size, digest = index.stat().st_size, _sha(index)
    _edit_manifest(directory, lambda m: m["splits"]["train"]["shards"][1].update(index_bytes=size, index_sha256=digest))
    with pytest.raises(ValueError, match="allow_pickle"):
        shards.verify(directory)


def test_verify_missing_and_resized_files_give_one_line_each(tmp_path):
    """A missing index and a token counts file of another size: one line each naming the file, and the checks that
    need the file (offsets, counts) are not run on it."""
    directory, counts = _two_splits(tmp_path)
    index = directory / "train-00001.idx.npy"
    index.unlink()
    counts_path = directory / "token_counts.npy"
    size = counts_path.stat().st_size
    np.save(counts_path, np.append(counts, 0))
    problems, _ = shards.verify(directory)
    assert problems == [
        f"{index}: missing",
        f"{counts_path}: {size + 8} bytes, the manifest says {size}",
    ]


def test_verify_index_offsets_bytes_and_split_totals(tmp_path):
    """Problems in files whose size and sha256 match the manifest: an index ending past the shard's tokens, a shard
    whose bytes are not its tokens x 2, a split whose totals differ from its shards'."""
    directory, _ = _two_splits(tmp_path)
    index = directory / "train-00001.idx.npy"
    np.save(index, np.array([0, 3], dtype=np.int64))
    size, digest = index.stat().st_size, _sha(index)

    def edit(m):
        m["splits"]["train"]["shards"][1].update(index_bytes=size, index_sha256=digest)
        m["splits"]["valid"]["shards"][0]["num_tokens"] = 12  # 22 bytes say 11
        m["splits"]["valid"]["num_tokens"] = 12
        m["splits"]["train"]["num_sequences"] = 4

    _edit_manifest(directory, edit)
    problems, _ = shards.verify(directory)
    assert problems == [
        f"{index}: offsets inconsistent with the manifest",
        f"{directory / 'manifest.json'}: split 'train' totals (4 sequences, 10 tokens) differ from its shards' (3, 10)",
        f"{directory / 'valid-00000.bin'}: manifest says 12 tokens but 22 bytes",
    ]


@pytest.mark.parametrize(
    "offsets,num_sequences,num_tokens,good",
    [
        ([0, 3, 8], 2, 8, True),
        ([0, 1, 8], 2, 8, True),  # a one-token sequence
        ([0, 3, 5, 8], 2, 8, False),  # one offset too many
        ([1, 3, 8], 2, 8, False),  # not from 0
        ([0, 3, 9], 2, 8, False),  # past the shard's tokens
        ([0, 3, 3, 8], 3, 8, False),  # an empty sequence
        ([0, 5, 3, 8], 3, 8, False),  # going back
    ],
)
def test_check_index(tmp_path, offsets, num_sequences, num_tokens, good):
    path = tmp_path / "i.npy"
    np.save(path, np.array(offsets, dtype=np.int64))
    assert shards._check_index(path, {"num_sequences": num_sequences, "num_tokens": num_tokens}) is good
