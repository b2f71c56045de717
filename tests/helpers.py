"""Shared helpers of the training-job tests (no tests here): tiny teachers and shards built once per session, launchers.

The assets are built once per pytest session (``assets()`` is cached) in a temporary directory: a tiny random RoBERTa
(byte-level BPE tokenizer trained in-process) and a tiny random BERT (WordPiece) from tests/tiny.py, saved as Hugging
Face directories, and shards of a small English corpus made with the project's own `python -m data_prep prepare`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
SEQ = 64  # max_seq_length of the test shards


@functools.cache
def assets() -> dict[str, Path]:
    """Tiny teachers and shards (paths): roberta, bert, bert-nohead (sentence encoder with pooling files),
    bert-short (32 positions), shards-roberta, shards-bert."""
    from tests import tiny

    root = Path(tempfile.mkdtemp(prefix="train-assets-"))
    atexit.register(shutil.rmtree, root, True)
    rt, bt = tiny.roberta_tokenizer(), tiny.bert_tokenizer()
    out = {
        "root": root,
        "roberta": tiny.save_model_dir(root / "roberta", tiny.roberta_model(rt, layers=4), rt),
        "bert": tiny.save_model_dir(root / "bert", tiny.bert_model(bt, layers=4), bt),
        "bert-nohead": tiny.save_model_dir(root / "bert-nohead", tiny.bert_model(bt, layers=4, mlm=False), bt),
    }
    # a sentence-transformers teacher: modules.json + pooling config next to the encoder
    st = out["bert-nohead"]
    (st / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (st / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": SEQ, "do_lower_case": False}))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    import torch
    from transformers import BertConfig, BertForMaskedLM

    short = BertConfig(
        vocab_size=len(bt),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=bt.pad_token_id,
    )
    torch.manual_seed(0)
    out["bert-short"] = tiny.save_model_dir(root / "bert-short", BertForMaskedLM(short).eval(), bt)
    lines = tiny.corpus(1)
    docs = [" ".join(lines[i:] + lines[:i]) for i in range(len(lines))]
    (root / "corpus.txt").write_text("\n\n".join(docs * 8) + "\n")
    from data_prep.__main__ import main as data_prep_main

    for family in ("roberta", "bert"):  # the project's own command line, run in this process
        shards = root / f"shards-{family}"
        with contextlib.redirect_stdout(io.StringIO()):
            rc = data_prep_main(
                [
                    "prepare",
                    "--source",
                    f"text:{root / 'corpus.txt'}",
                    "--tokenizer",
                    str(out[family]),
                    "--max-seq-length",
                    str(SEQ),
                    "--output",
                    str(shards),
                    "--valid-fraction",
                    "0.15",
                    "--num-proc",
                    "0",
                    "--no-progress",
                ]
            )
        assert rc == 0, f"data_prep prepare failed for {family}"
        out[f"shards-{family}"] = shards
    return out


def env(**extra) -> dict[str, str]:
    """Environment for subprocesses: one torch thread per rank (2 shared cores); the package is installed (make
    setup)."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)  # set in this process by in-process runs; launchers set their own
    e.update(extra)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(family: str, out: Path, *, steps: int, **extra) -> list[str]:
    """Overrides that point a config at the tiny ``family`` teacher and shards, a small batch and ``out``."""
    a = assets()
    items = {
        "teacher.name_or_path": str(a[family]),
        "data.dir": str(a[f"shards-{family}"]),
        "train.output_dir": str(out),
        "train.max_steps": steps,
        "train.log_interval": 1,
        "deepspeed.train_batch_size": 4,
        "deepspeed.train_micro_batch_size_per_gpu": 2,
        "deepspeed.gradient_accumulation_steps": None,
        **extra,
    }  # None: derived
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in items.items()]


def read_metrics(run: Path, split: str = "train") -> list[dict]:
    """metrics.jsonl records of one split, in file order."""
    from pretrain.metrics import read_metrics as read_records

    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in read_records(path) if r.get("split") == split]


def losses(run: Path) -> dict[int, dict[str, float]]:
    """step -> {loss, loss_<term>} of a run's train records."""
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss")} for r in read_metrics(run)}


def assert_same_losses(a: dict, b: dict, steps, tol: float = 1e-6) -> None:
    """The same loss values (within ``tol``) at every step of ``steps``; a term logged as None (off at that step, or
    every step of the interval skipped) counts as absent."""
    diffs = [
        abs(a[s][k] - b[s][k])
        for s in steps
        if s in a and s in b
        for k in a[s]
        if a[s][k] is not None and b[s].get(k) is not None
    ]
    record_effect(f"same losses: max difference / {tol:g}", max(diffs, default=0.0) / tol, 1.0, "tolerance share <=")
    for s in steps:
        assert s in a and s in b, f"step {s} missing: {sorted(a)} / {sorted(b)}"
        va = {k: v for k, v in a[s].items() if v is not None}
        vb = {k: v for k, v in b[s].items() if v is not None}
        assert va.keys() == vb.keys(), (s, va, vb)
        for k in va:
            assert abs(va[k] - vb[k]) <= tol, f"step {s} {k}: {va[k]} vs {vb[k]}"


def run_cmd(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run a launcher to completion; output captured (shown by the assertion on failure)."""
    return subprocess.run(
        cmd, cwd=REPO, env=kw.pop("env", env()), capture_output=True, text=True, timeout=timeout, **kw
    )


def deepspeed_cmd(config: Path | str, overrides: list[str], *, ranks: int = 2, port: int | None = None) -> list[str]:
    """``deepspeed --num_gpus N --master_port P launch/pretrain.py --config C overrides`` (CPU ranks here)."""
    return [
        PY,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port or free_port()),
        "launch/pretrain.py",
        "--config",
        str(config),
        *overrides,
    ]


def rank_pids(launcher_pid: int) -> list[int]:
    """PIDs of the training ranks under a launcher (launch/pretrain.py hands each rank over to
    `python -m pretrain.main`)."""
    import psutil

    out = []
    for p in psutil.Process(launcher_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = p.cmdline()
            if "pretrain.main" in cmd:
                out.append(p.pid)
    return out


def wait_for_ranks(proc: subprocess.Popen, n: int, log: Path, timeout: float = 240) -> list[int]:
    """Poll until ``n`` training ranks run under ``proc``; returns their PIDs."""
    end = time.time() + timeout
    while time.time() < end:
        pids = rank_pids(proc.pid)
        if len(pids) == n:
            return pids
        if proc.poll() is not None:
            raise AssertionError(f"the launcher ended (rc {proc.returncode}):\n{Path(log).read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"{n} ranks not found within {timeout} s")


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    """Poll metrics.jsonl until a train record with step >= ``step``; returns the last step seen."""
    end = time.time() + timeout
    while time.time() < end:
        recs = read_metrics(run)
        if recs and recs[-1]["step"] >= step:
            return recs[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}:\n{Path(log).read_text()}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s:\n{Path(log).read_text()}")


@contextlib.contextmanager
def saved_signal_handlers():
    """Restore SIGTERM / SIGUSR1 handlers after an in-process Trainer installed its own."""
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def thread_count() -> int:
    """Torch threads of the tests' in-process training: ``$OMP_NUM_THREADS`` where set (to measure the tests under
    another thread count, docs/testing.md), else 1 (tiny models; the cores are shared)."""
    return int(os.environ.get("OMP_NUM_THREADS") or 1)


@contextlib.contextmanager
def torch_threads(n: int | None = None):
    """Run the block with ``n`` torch threads (default :func:`thread_count`) and ``OMP_NUM_THREADS=n`` (the trainer
    sizes its thread pool from it); both are restored afterwards."""
    import torch

    n = n or thread_count()
    old_n, old_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old_n)
        if old_env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_env


def train_in_process(cfg, *, before_fit=None):
    """Set up and fit a one-rank Trainer in this process; returns it (closed). :func:`thread_count` torch threads,
    restored afterwards."""
    from pretrain.trainer import Trainer

    with torch_threads(), saved_signal_handlers():
        trainer = Trainer(cfg)
        try:
            trainer.setup()
            if before_fit is not None:
                before_fit(trainer)
            trainer.fit()
        finally:
            trainer.close()
    return trainer


# ------------------------------------------------------------------------------ measured effects (docs/testing.md)
EFFECTS_ENV = "BERT_DISTILL_TEST_EFFECTS"  # a JSON-lines file the measured effects are appended to, where set


def record_effect(name: str, value: float, threshold: float, kind: str) -> None:
    """Print one measured effect (seen with ``pytest -s``) and append it to ``$BERT_DISTILL_TEST_EFFECTS``."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    print(f"[effect] {test} {name}: {value:.6g} ({kind} {threshold:g})")
    path = os.environ.get(EFFECTS_ENV)
    if path:
        rec = {"test": test, "name": name, "value": value, "threshold": threshold, "kind": kind}
        with open(path, "a", encoding="utf-8") as f:  # test measurement log, not a project file
            f.write(json.dumps(rec) + "\n")


def assert_effect(name: str, value: float, threshold: float, context=None) -> None:
    """Assert a learning effect (a gain, a loss drop, a gap to a control) is above ``threshold``, and record it.

    The thresholds are set to at most half the smallest effect measured across CPU kernels and thread counts
    (docs/testing.md), so that a test holds on any x86-64 CPU."""
    record_effect(name, float(value), threshold, ">")
    assert value > threshold, (name, value, threshold, context)


def tolerance_share(got, want, *, rtol: float, atol: float) -> float:
    """The largest ``|got - want| / (atol + rtol |want|)`` (torch.allclose passes at most 1), in float64."""
    import torch

    got_t, want_t = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    return float(((got_t - want_t).abs() / (atol + rtol * want_t.abs())).max()) if want_t.numel() else 0.0


def assert_close_recorded(name: str, got, want, *, rtol: float, atol: float) -> None:
    """``torch.allclose(got, want, rtol, atol)`` for tensors or for dicts of tensors with the same keys, recording the
    share of the tolerance used (:func:`tolerance_share`, the largest over the keys; docs/testing.md asks for at most
    0.5 measured)."""
    pairs = {k: (got[k], want[k]) for k in want} if isinstance(want, dict) else {"": (got, want)}
    if isinstance(want, dict):
        assert set(got) == set(want), (name, sorted(got), sorted(want))
    shares = {k: tolerance_share(g, w, rtol=rtol, atol=atol) for k, (g, w) in pairs.items()}
    worst = max(shares, key=shares.__getitem__) if shares else ""
    record_effect(name, shares.get(worst, 0.0), 1.0, "tolerance share <=")
    assert shares.get(worst, 0.0) <= 1.0, (name, worst, shares[worst], pairs[worst])
