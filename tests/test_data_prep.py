"""data_prep: round trip, token conservation, split, determinism, kill + resume, verify, bad input, dtype, readers.

Real text (the embedded Wikipedia extracts and plays), the embedded teacher's tokenizer and a byte-level BPE trained
here. The embedded assets are fetched once into the default cache (session fixture).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.__main__ import main
from data_prep.embedded import fetch_embedded
from data_prep.errors import DataPrepError
from data_prep.prepare import STATE, PrepareConfig, prepare, split_hash
from data_prep.shards import ShardedTokens, load_manifest, load_token_counts
from data_prep.sources import parse_source, play_documents, text_documents
from data_prep.tokenizer import Encoder, backend_json, load_tokenizer, token_dtype

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# fixtures
@pytest.fixture(scope="session")
def embedded():
    return fetch_embedded()


@pytest.fixture(scope="session")
def wiki_texts(embedded):
    with open(embedded["wikipedia"], encoding="utf-8") as f:
        return [e["extract"] for e in json.load(f).values()]


@pytest.fixture(scope="session")
def minilm(embedded):
    return load_tokenizer("embedded:minilm-l6")


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory, wiki_texts):
    """A byte-level BPE (RoBERTa-style, <s> ... </s>) trained here on real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(wiki_texts[:300], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    path = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(path)
    return path


def write_jsonl(path: Path, texts) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def looks_complete(directory: Path) -> bool:
    return directory.exists() and ((directory / "manifest.json").exists() or any(directory.glob("*.bin")))


def cfg(sources, tokenizer, output, **kw) -> PrepareConfig:
    kw.setdefault("num_proc", 0)
    kw.setdefault("progress", False)
    return PrepareConfig(sources=[str(s) for s in sources], tokenizer=str(tokenizer), output=str(output), **kw)


def expected_split(n: int, seed: int, fraction: float) -> np.ndarray:
    return split_hash(seed, np.arange(n, dtype=np.int64)) < fraction


# ---------------------------------------------------------------------------------------------------------------------
# round trip, conservation, split, format
def test_roundtrip_bpe_is_exact_and_split_is_disjoint(tmp_path, bpe_dir, wiki_texts):
    docs = wiki_texts[:120]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")  # extracts contain single newlines only
    out = tmp_path / "out"
    manifest = prepare(
        cfg([f"text:{corpus}"], bpe_dir, out, max_seq_length=64, valid_fraction=0.25, seed=3, shard_tokens=2000)
    )
    tok = load_tokenizer(str(bpe_dir))
    is_valid = expected_split(len(docs), 3, 0.25)
    assert 10 < is_valid.sum() < 60
    for split, want in (("train", ~is_valid), ("valid", is_valid)):
        ds = ShardedTokens(out, split)
        got = [tok.decode(d.tolist()) for d in ds.documents()]
        assert got == [d.strip() for d, w in zip(docs, want, strict=False) if w]  # byte-level BPE: exact text back
        assert ds[0][0] == tok.cls_token_id == 0 and ds[0][-1] == tok.sep_token_id == 2
        assert manifest["splits"][split]["num_documents"] == int(want.sum())
    assert len(manifest["splits"]["train"]["shards"]) > 3  # several shards, documents spanning them


def test_minilm_ids_conservation_and_counts(tmp_path, minilm, wiki_texts):
    texts = [*wiki_texts[200:500], "", "   ", "Short one.", "A literal [SEP] and [CLS] in text."]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    out = tmp_path / "out"
    L = 48
    m = prepare(
        cfg(
            [f"jsonl:{corpus}"],
            "embedded:minilm-l6",
            out,
            max_seq_length=L,
            valid_fraction=0.1,
            min_doc_tokens=4,
            shard_tokens=3000,
        )
    )
    want_ids = minilm([t.strip() for t in texts], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    lengths = np.array([len(x) for x in want_ids])
    kept = lengths >= 4
    valid = expected_split(len(texts), 0, 0.1)
    assert m["dropped"]["empty"]["documents"] == 2
    assert m["dropped"]["short"] == {
        "documents": int((~kept & (lengths > 0)).sum()),
        "tokens": int(lengths[~kept].sum()),
        "min_doc_tokens": 4,
    }
    assert m["dropped"]["short"]["documents"] >= 1  # "Short one." has 3 tokens
    assert m["special_tokens_in_text"] == 0  # the literal [SEP] / [CLS] were tokenized as text
    content = 0
    for split, sel in (("train", kept & ~valid), ("valid", kept & valid)):
        ds = ShardedTokens(out, split)
        docs = list(ds.documents())
        assert [d.tolist() for d in docs] == [want_ids[i] for i in np.flatnonzero(sel)]
        seqs = [ds[i] for i in range(len(ds))]
        assert all(s[0] == 101 and s[-1] == 102 for s in seqs)
        assert all(len(s) == L for s in seqs[:-1]) and 3 <= len(seqs[-1]) <= L
        assert np.array_equal(ds.lengths, [len(s) for s in seqs])
        n_tokens = sum(map(len, seqs))
        split_content = int(lengths[sel].sum())
        # every stored token is a document token, a document separator, or a sequence's CLS/SEP
        assert n_tokens == split_content + int(sel.sum()) + 2 * len(ds) == m["splits"][split]["num_tokens"]
        assert ds.dtype == np.uint16 and seqs[0].dtype == np.uint16
        content += split_content
        if split == "train":
            counts = load_token_counts(out)
            assert counts.shape == (30522,) and counts.dtype == np.int64
            assert np.array_equal(counts, np.bincount(np.concatenate(seqs), minlength=30522))
    assert content + m["dropped"]["short"]["tokens"] == lengths.sum()  # token conservation
    assert sum(s["tokens"] for s in m["sources"]) == lengths.sum()
    # normalisation-level text round trip (uncased WordPiece): same characters, ignoring spaces
    norm = minilm.backend_tokenizer.normalizer.normalize_str
    ds = ShardedTokens(out, "train")
    src = [t.strip() for t, s in zip(texts, kept & ~valid, strict=False) if s]
    compared = 0
    for ids, text in zip(ds.documents(), src, strict=False):
        if 100 in ids:  # [UNK] stands for characters outside the vocabulary
            continue
        assert "".join(minilm.decode(ids.tolist()).split()) == "".join(norm(text).split())
        compared += 1
    assert compared > 200


def test_output_independent_of_num_proc_and_batching(tmp_path, wiki_texts):
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_texts[:400])
    common = {"max_seq_length": 32, "valid_fraction": 0.1, "shard_tokens": 5000}
    prepare(cfg([f"jsonl:{corpus}"], "embedded:minilm-l6", tmp_path / "a", num_proc=0, batch_chars=1 << 20, **common))
    prepare(cfg([f"jsonl:{corpus}"], "embedded:minilm-l6", tmp_path / "b", num_proc=2, batch_chars=3000, **common))
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert len(a) > 8 and a == b


def test_already_complete_and_different_run(tmp_path, capsys, wiki_texts):
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_texts[:50])
    out = tmp_path / "out"
    base = [
        "prepare",
        "--source",
        f"jsonl:{corpus}",
        "--tokenizer",
        "embedded:minilm-l6",
        "--output",
        out,
        "--num-proc",
        0,
        "--no-progress",
    ]
    args = [*base, "--max-seq-length", 64]
    assert run(capsys, *args)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run(capsys, *args)
    assert code == 0 and "already complete" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    code, _, err = run(capsys, *base, "--max-seq-length", 32)
    assert code == 2 and "the output of another run (--max-seq-length: 64 there, 32 here)" in err
    assert "--overwrite" in err  # the argument that differs is named, not the old config dumped (issue 24 item 9)
    assert load_manifest(out)["max_seq_length"] == 64  # untouched
    (out / "notes.txt").write_text("mine")
    (out / "train-notes.bin").write_text("mine too")
    code, _, _ = run(capsys, *base, "--max-seq-length", 32, "--overwrite")
    assert code == 0 and load_manifest(out)["max_seq_length"] == 32 and run(capsys, "verify", out)[0] == 0
    assert (out / "notes.txt").exists() and (out / "train-notes.bin").exists()  # --overwrite removes only ours


def test_uint32_for_large_vocabularies(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    assert token_dtype(30522) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    vocab = {f"w{i}": i for i in range(70000)}
    vocab.update({"[UNK]": 70000, "[CLS]": 70001, "[SEP]": 70002})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=rng.integers(5, 40)) for _ in range(30)]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(" ".join(f"w{i}" for i in d) for d in docs))
    m = prepare(cfg([f"text:{corpus}"], tmp_path / "tok", tmp_path / "out", max_seq_length=16, valid_fraction=0.0))
    ds = ShardedTokens(tmp_path / "out", "train")
    assert m["dtype"] == "uint32" and ds[0].dtype == np.uint32
    assert [d.tolist() for d in ds.documents()] == [d.tolist() for d in docs]
    assert max(int(d.max()) for d in docs) > 65535
    assert (tmp_path / "out" / "train-00000.bin").stat().st_size == 4 * m["splits"]["train"]["num_tokens"]


def test_reader_api(tmp_path, wiki_texts):
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_texts[:60])
    prepare(
        cfg(
            [f"jsonl:{corpus}"],
            "embedded:minilm-l6",
            tmp_path / "out",
            max_seq_length=40,
            shard_tokens=1000,
            valid_fraction=0.0,
        )
    )
    ds = ShardedTokens(tmp_path / "out", "train")
    n = len(ds)
    assert n == ds.manifest["splits"]["train"]["num_sequences"] and len(ds.manifest["splits"]["train"]["shards"]) > 3
    assert np.array_equal(ds[-1], ds[n - 1])
    with pytest.raises(IndexError):
        ds[n]
    x = ds[5]
    x[:] = 0  # a copy: the shard is not modified
    assert ds[5][0] == 101
    clone = pickle.loads(pickle.dumps(ds))
    assert all(np.array_equal(clone[i], ds[i]) for i in range(0, n, 7))
    assert len(pickle.dumps(ds)) < 20000  # no token data in the pickle
    with pytest.raises(DataPrepError, match="no split 'test'"):
        ShardedTokens(tmp_path / "out", "test")
    valid = ShardedTokens(tmp_path / "out", "valid")
    assert len(valid) == 0 and list(valid.documents()) == [] and valid.lengths.shape == (0,)


def test_encoder_matches_transformers_call(minilm, bpe_dir, wiki_texts):
    texts = [*wiki_texts[:50], "x [MASK] <s> y", ""]
    for tok in (minilm, load_tokenizer(str(bpe_dir))):
        enc = Encoder(backend_json(tok), np.uint32)
        ids, lengths = enc(texts)
        want = tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert lengths.tolist() == [len(w) for w in want]
        assert ids.tolist() == [i for w in want for i in w]


# ---------------------------------------------------------------------------------------------------------------------
# kill and resume
def _state_shards(out: Path) -> list[str]:
    with np.load(out / STATE) as z:
        meta = json.loads(z["meta"].tobytes())
    return [r["file"] for s in meta["splits"].values() for r in s["writer"]["done"]]


def test_sigkill_and_restart_gives_identical_output(tmp_path, capsys, wiki_texts):
    import psutil

    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_texts[:4000])
    args = [
        "prepare",
        "--source",
        f"jsonl:{corpus}",
        "--tokenizer",
        "embedded:minilm-l6",
        "--max-seq-length",
        "64",
        "--shard-tokens",
        "8192",
        "--batch-chars",
        "16000",
        "--valid-fraction",
        "0.05",
        "--no-progress",
    ]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert run(capsys, *args, "--output", ref, "--num-proc", 0)[0] == 0
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", *args, "--output", str(out), "--num-proc", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not (out / "train-00002.bin").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.003)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists() and (out / STATE).exists()
    finished = _state_shards(out)
    assert "train-00000.bin" in finished and len(finished) < len(file_hashes(ref)) // 2
    kept = {f: (out / f).stat() for f in finished}
    _gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "tokenizer workers outlived the killed prepare"

    code, _, err = run(capsys, *args, "--output", out, "--num-proc", 1)
    assert code == 0 and "resuming" in err
    assert file_hashes(out) == file_hashes(ref)
    for f, st in kept.items():  # finished shards were not redone
        now = (out / f).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not (out / STATE).exists()


def test_a_dead_worker_stops_the_run_with_a_clear_error(tmp_path, wiki_texts):
    import psutil

    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_texts[:4000])
    out = tmp_path / "run"
    env = dict(os.environ)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "data_prep",
            "prepare",
            "--source",
            f"jsonl:{corpus}",
            "--tokenizer",
            "embedded:minilm-l6",
            "--max-seq-length",
            "64",
            "--shard-tokens",
            "8192",
            "--batch-chars",
            "16000",
            "--num-proc",
            "2",
            "--no-progress",
            "--output",
            str(out),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "train-00001.bin").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.003)
    workers = [p for p in psutil.Process(proc.pid).children() if "resource_tracker" not in " ".join(p.cmdline())]
    workers[0].kill()  # e.g. the kernel's OOM killer
    assert proc.wait(timeout=60) == 2  # not a hang
    assert "worker process died" in proc.stderr.read()
    assert not (out / "manifest.json").exists() and (out / STATE).exists()  # resumable


# ---------------------------------------------------------------------------------------------------------------------
# verify
def test_verify_catches_a_flipped_byte(tmp_path, capsys, wiki_texts):
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_texts[:80])
    out = tmp_path / "out"
    prepare(
        cfg([f"jsonl:{corpus}"], "embedded:minilm-l6", out, max_seq_length=64, shard_tokens=2500, valid_fraction=0.2)
    )
    code, stdout, _ = run(capsys, "verify", out)
    assert code == 0 and "OK" in stdout
    target = out / "train-00001.bin"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    code, _, err = run(capsys, "verify", out)
    assert code == 1 and "train-00001.bin" in err and "sha256" in err and "train-00000.bin" not in err
    (out / "valid-00000.idx.npy").unlink()
    code, _, err = run(capsys, "verify", out)
    assert code == 1 and "valid-00000.idx.npy: missing" in err
    code, _, err = run(capsys, "verify", tmp_path)
    assert code == 2 and "manifest.json" in err


def test_inspect_shows_text(tmp_path, capsys, wiki_texts):
    corpus = write_jsonl(tmp_path / "c.jsonl", wiki_texts[:20])
    prepare(cfg([f"jsonl:{corpus}"], "embedded:minilm-l6", tmp_path / "out", max_seq_length=64, valid_fraction=0.0))
    code, stdout, _ = run(capsys, "inspect", tmp_path / "out", "--n", 2)
    assert code == 0 and stdout.count("--- sequence") == 2
    assert "[CLS] 20th - century classical music is western art music" in stdout  # wiki_texts[0], uncased


# ---------------------------------------------------------------------------------------------------------------------
# bad input: clear error, non-zero exit, nothing left that looks complete
def _prep_args(out, *sources, tokenizer="embedded:minilm-l6", extra=()):
    args = ["prepare"]
    for s in sources:
        args += ["--source", s]
    return [
        *args,
        "--tokenizer",
        tokenizer,
        "--max-seq-length",
        "64",
        "--output",
        out,
        "--num-proc",
        "0",
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize(
    "case",
    ["glob", "missing", "kind", "empty", "tokenizer_path", "tokenizer_dir", "no_cls_sep", "bad_json", "no_field"],
)
def test_bad_input(tmp_path, capsys, case, wiki_texts):
    out = tmp_path / "out"
    good = write_jsonl(tmp_path / "good.jsonl", wiki_texts[:30])
    tokenizer = "embedded:minilm-l6"
    if case == "glob":
        source, expect = f"text:{tmp_path}/*.nothing", ["matches no files", "*.nothing"]
    elif case == "missing":
        source, expect = f"jsonl:{tmp_path}/missing.jsonl", ["file not found", "missing.jsonl"]
    elif case == "kind":
        source, expect = "csv:data.csv", ["unknown source kind 'csv'", "jsonl:GLOB"]
    elif case == "empty":
        (tmp_path / "blank.txt").write_text("\n\n   \n\t\n")
        source, expect = f"text:{tmp_path}/blank.txt", ["corpus is empty", "0 documents"]
    elif case == "tokenizer_path":
        source, tokenizer, expect = f"jsonl:{good}", str(tmp_path / "no-such-tokenizer"), ["no such file"]
    elif case == "tokenizer_dir":
        (tmp_path / "emptydir").mkdir()
        source, tokenizer, expect = f"jsonl:{good}", str(tmp_path / "emptydir"), ["cannot load a tokenizer"]
    elif case == "no_cls_sep":
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        t = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]").save_pretrained(tmp_path / "plain")
        source, tokenizer, expect = f"jsonl:{good}", str(tmp_path / "plain"), ["cls/sep (or bos/eos)"]
    elif case == "bad_json":  # fails after many documents were processed
        bad = write_jsonl(tmp_path / "bad.jsonl", wiki_texts[:300])
        with open(bad, "a") as f:
            f.write('{"text": "unterminated\n')
        source, expect = f"jsonl:{bad}", ["bad.jsonl: line 301", "not valid JSON"]
    else:
        source, expect = f"jsonl:{good}:body", ["no field 'body'", "good.jsonl: line 1"]
    code, _, err = run(capsys, *_prep_args(out, source, tokenizer=tokenizer))
    assert code == 2 and err.startswith("error: ")
    for e in expect:
        assert e in err
    assert not looks_complete(out) and not (out.exists() and any(out.iterdir()))


def test_undecodable_bytes_named_then_replaced(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"First document here.\n\nSecond one, caf" + b"\xe9 au lait.\n")
    out = tmp_path / "out"
    code, _, err = run(capsys, *_prep_args(out, f"text:{path}"))
    assert code == 2 and f"{path}: undecodable bytes at byte offset 37" in err and "--errors replace" in err
    assert not looks_complete(out)
    code, _, _ = run(capsys, *_prep_args(out, f"text:{path}", extra=["--errors", "replace", "--valid-fraction", "0"]))
    assert code == 0
    docs = [load_tokenizer("embedded:minilm-l6").decode(d.tolist()) for d in ShardedTokens(out).documents()]
    assert docs == ["first document here.", "second one, caf au lait."]  # BERT's normaliser drops U+FFFD


def test_options_are_checked(tmp_path):
    for kw, msg in (
        ({"max_seq_length": 2}, "--max-seq-length"),
        ({"valid_fraction": 1.0}, "--valid-fraction"),
        ({"shard_tokens": 10}, "--shard-tokens"),
        ({"min_doc_tokens": 0}, "--min-doc-tokens"),
    ):
        kw.setdefault("max_seq_length", 64)
        with pytest.raises(DataPrepError, match=msg):
            prepare(cfg(["embedded"], "embedded:minilm-l6", tmp_path / "o", **kw))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------------
# readers
def test_text_and_jsonl_and_parquet_readers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = tmp_path / "a.txt"
    t.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n\r\n\r\n  \nsecond doc\n")
    assert list(text_documents(t)) == ["line one\nline two", "second doc"]
    src = parse_source(f"text:{tmp_path}/*.txt")
    assert src.files == [t] and src.describe()["files"] == 1
    j = tmp_path / "b.jsonl"
    j.write_text('{"body": "x y", "id": 1}\n\n{"body": null}\n')
    assert list(parse_source(f"jsonl:{j}:body").documents()) == ["x y", ""]
    pq.write_table(pa.table({"content": ["p", None, "q r"]}), tmp_path / "c.parquet")
    assert list(parse_source(f"parquet:{tmp_path}/*.parquet:content").documents()) == ["p", "", "q r"]
    with pytest.raises(DataPrepError, match="no column 'text'"):
        list(parse_source(f"parquet:{tmp_path}/c.parquet").documents())
    hf = parse_source("hf:user/data:cfg::body")
    assert hf.hf == ("user/data", "cfg", "train") and hf.field == "body"
    (tmp_path / "hfdata").mkdir()
    (tmp_path / "hfdata" / "train.jsonl").write_text('{"body": "from datasets"}\n{"body": "second row"}\n')
    assert list(parse_source(f"hf:{tmp_path}/hfdata:::body").documents()) == ["from datasets", "second row"]
    with pytest.raises(DataPrepError, match="no field 'text'"):
        list(parse_source(f"hf:{tmp_path}/hfdata").documents())
    assert parse_source("wikipedia").hf == ("wikimedia/wikipedia", "20231101.en", "train")


def test_play_scenes(tmp_path, embedded):
    md = tmp_path / "p.md"
    md.write_text(
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter BOB_\n\n**BOB**  \nHello there,  \n"
        "my _dear_ friend.\n\n**ANN**  \n\\[Aside] Hi.\n\n_Exeunt_\n\n### SCENE II. Outside.\n\n"
        "**BOB**  \nBye.\n"
    )
    assert list(play_documents(md)) == [
        "A Play\nACT I\nSCENE I. A room.\nEnter BOB\nBOB: Hello there,\nmy dear friend.\nANN: [Aside] Hi.\nExeunt",
        "A Play\nACT I\nSCENE II. Outside.\nBOB: Bye.",
    ]
    plays = sorted(embedded["books"].glob("*/*.md"))
    assert len(plays) == 38
    scenes = list(play_documents(embedded["books"] / "tragedies" / "hamlet.md"))
    assert len(scenes) == 20 and scenes[0].startswith("Hamlet\nACT I\nSCENE I. Elsinore.")
    assert not any("**" in s or "\\[" in s for s in scenes)


def test_writer_resumes_after_a_rename_that_missed_its_checkpoint(tmp_path):
    from data_prep.shards import ShardWriter

    rows = np.arange(60 * 8, dtype=np.uint16).reshape(60, 8)
    for d in ("ref", "run"):
        (tmp_path / d).mkdir()
    ref = ShardWriter(tmp_path / "ref", "train", np.uint16, 100)
    ref.write(rows)
    ref.close()
    w = ShardWriter(tmp_path / "run", "train", np.uint16, 100)
    w.write(rows[:20])  # shard 0 finished (13 rows = 104 tokens), 7 rows of shard 1 written
    w.sync()
    state, offsets = w.state()
    w.write(rows[20:30])  # shard 1 finished and renamed, shard 2 begun: then the process "dies"
    w.abandon()
    assert (tmp_path / "run" / "train-00001.bin").exists()
    w = ShardWriter(tmp_path / "run", "train", np.uint16, 100)
    w.resume(state, offsets)
    w.write(rows[20:])
    assert w.close() == ref.done and len(ref.done) == 5
    assert file_hashes(tmp_path / "run") == file_hashes(tmp_path / "ref")


def test_a_killed_atomic_write_leaves_a_temp_file_that_prepare_finds(tmp_path):
    """atomic_path's temporary name is what prepare's resume removes (a SIGKILL mid-write leaves it behind)."""
    from data_prep.files import atomic_path, leftover_temps

    with atomic_path(tmp_path / STATE) as tmp:
        tmp.write_bytes(b"half")
        assert leftover_temps(tmp_path, (STATE,)) == [tmp]  # what a kill here would leave
        assert leftover_temps(tmp_path, ("manifest.json",)) == []
    assert (tmp_path / STATE).read_bytes() == b"half" and leftover_temps(tmp_path, (STATE,)) == []


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    """The export's and downstream's folder writes: the old folder stays as it was when the block fails, and is
    replaced whole when it succeeds; no temporary folder is left either way."""
    from data_prep.files import OUTPUT_MARKER, atomic_dir

    out = tmp_path / "student"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("half")
        raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"] and (out / "config.json").read_text() == "old"
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "model.safetensors"]


def test_progress_has_a_total_and_ends_at_the_summarys_token_count(tmp_path, bpe_dir, wiki_texts, capsys):
    """prepare's bar knows how many documents a jsonl source holds (total and ETA), and its last token count is the
    summary's "document tokens" (issue 24 item 10: it stopped at 1.4M of 2.35M)."""
    docs = wiki_texts[:60]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": d}) + "\n" + ("\n" if i % 7 == 0 else "") for i, d in enumerate(docs))
    )
    from data_prep.sources import parse_source

    assert parse_source(f"jsonl:{corpus}").num_documents() == 60  # blank lines are not documents
    manifest = prepare(cfg([f"jsonl:{corpus}"], bpe_dir, tmp_path / "out", max_seq_length=64, progress=True))
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()
    last = [line for line in final if line.startswith("prepare")][-1]
    assert "100%" in last and "/60.0 " in last
    tokens = sum(src["tokens"] for src in manifest["sources"])  # every document's tokens, dropped ones included
    assert f"{tokens:,} document tokens" in last
