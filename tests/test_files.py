"""data_prep.files and its callers (issue 20 items 2-3, issue 24 item 1): modes under the umask, one message for a
full disk at any write (injected ENOSPC, no root needed), and folder writers that never delete what they did not
write (the export onto a run directory)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from data_prep.files import (
    OUTPUT_MARKER,
    DiskFullError,
    OutputExistsError,
    atomic_dir,
    atomic_path,
    atomic_write_text,
    check_replaceable,
    disk_full_message,
)
from tests.helpers import REPO, assets, tiny_overrides, train_in_process

TINY = REPO / "configs" / "tiny-cpu.json"
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    """Run the test under this umask; the old one is restored after it."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """``{relative path: permission bits}`` of every file and folder under ``root`` (pytest makes ``root`` itself
    0700), leaving out executable files (DeepSpeed copies its recovery scripts with their own mode)."""
    out = {}
    for p in root.rglob("*"):
        mode = p.stat().st_mode & 0o777
        if p.is_file() and mode & 0o100:
            continue
        out[str(p.relative_to(root))] = mode
    return out


def expect(root: Path, umask: int) -> None:
    want_dir, want_file = 0o777 & ~umask, 0o666 & ~umask
    wrong = {
        k: oct(v)
        for k, v in modes(root).items()
        if v != (want_dir if (root / k).is_dir() else want_file) and not k.startswith(".lock")
    }
    assert not wrong, f"under umask {umask:03o}: {wrong}"


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished two-step tiny BERT run (checkpoint at step 2, student_init/, student/); tests copy it before changing
    anything."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    over = tiny_overrides("bert", out, steps=2, **{"train.save_interval": 2, "train.eval_interval": 0})
    train_in_process(_load(over))
    return out


def test_every_metrics_field_of_a_run_is_documented(tiny_run):
    """docs/metrics.md names every field a run writes to metrics.jsonl (issue 24 item 11: none did)."""
    from pretrain.metrics import read_metrics

    doc = (REPO / "docs" / "metrics.md").read_text()
    keys = {k for r in read_metrics(tiny_run / "metrics.jsonl") for k in r}
    assert keys >= {"split", "step", "loss", "tokens_per_s", "mfu"}
    assert not {k for k in keys if f"`{k}`" not in doc}


def test_the_run_records_its_machine(tiny_run):
    """environment.json: each start's machine, frameworks, ranks and step (the report's training provenance)."""
    import json

    import torch

    (start,) = json.loads((tiny_run / "environment.json").read_text())["starts"]
    assert start["world_size"] == 1 and start["step"] == 0 and start["torch"] == torch.__version__
    assert start["gpu"] is None and start["cpu"] and start["deepspeed"]


def _load(over):
    from pretrain.config import load

    return load(TINY, over)


# -- permissions ------------------------------------------------------------------------------------------------


def test_atomic_helpers_give_the_modes_of_a_plain_open_and_mkdir(umask, tmp_path):
    atomic_write_text(tmp_path / "a.json", "{}")
    with atomic_path(tmp_path / "b.bin") as tmp:  # a writer that makes its own 0600 file (safetensors 0.8 does)
        tmp.unlink()
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.txt").write_text("x")
        os.close(os.open(tmp / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600))
    expect(tmp_path, umask)
    atomic_write_text(tmp_path / "script.sh", "#!/bin/sh\n", mode=0o750)  # an explicit mode is kept
    assert (tmp_path / "script.sh").stat().st_mode & 0o777 == 0o750


def test_prepared_shards_checkpoints_and_exports_follow_the_umask(umask, tmp_path):
    from data_prep.__main__ import main as data_prep_main
    from pretrain.export import main as export_main

    a = assets()
    shards = tmp_path / "shards"
    cmd = ["prepare", "--source", f"text:{a['root'] / 'corpus.txt'}", "--tokenizer", str(a["bert"])]
    cmd += ["--max-seq-length", "64", "--output", str(shards), "--num-proc", "0", "--no-progress"]
    rc = data_prep_main([*cmd, "--valid-fraction", "0.15", "--shard-tokens", "2000"])
    assert rc == 0 and len(list(shards.glob("train-*.idx.npy"))) > 1
    expect(shards, umask)
    run = tmp_path / "run"
    over = tiny_overrides("bert", run, steps=2, **{"train.save_interval": 2, "train.eval_interval": 0})
    train_in_process(_load([*over, f"data.dir={shards}"]))
    assert (run / "student" / "model.safetensors").is_file() and (run / "checkpoints" / "latest").is_file()
    assert export_main([str(run / "checkpoints"), str(tmp_path / "exported")]) == 0
    expect(tmp_path, umask)


# -- a full disk ----------------------------------------------------------------------------------------------------


def test_disk_full_message_names_what_where_needed_free_and_intact(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100 * 2**20, 99 * 2**20, 2**20))
    msg = disk_full_message("export", tmp_path / "student", ENOSPC, needed=3 * 2**20, intact="the old one is intact")
    assert msg == (
        f"could not write export {tmp_path / 'student'} (OSError: [Errno 28] No space left on device); it needs about "
        "3.0 MiB and 1.0 MiB are free on that file system; the old one is intact. Free space and run the same "
        "command again"
    )


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    from pretrain.export import main as export_main

    def full(*a, **k):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(mu, "safe_save_file", full)
    out = tmp_path / "student"
    assert export_main([str(tiny_run / "checkpoints"), str(out)]) == 1
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err
    err = errors[0]
    assert err.startswith(f"error: could not write export {out} (SafetensorError: "), err
    assert "No space left on device" in err and "MiB are free" in err and "it needs about 0.2 MiB" in err, err
    assert f"nothing was written at {out} and the temporary folder was removed" in err, err
    assert list(tmp_path.iterdir()) == []  # no temporary folder, no partial export
    monkeypatch.undo()
    assert export_main([str(tiny_run / "checkpoints"), str(out)]) == 0
    before = snapshot(out)
    monkeypatch.setattr(mu, "safe_save_file", full)
    assert export_main([str(tiny_run / "checkpoints"), str(out)]) == 1
    assert f"{out} is unchanged" in capsys.readouterr().err
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_initial_export_on_a_full_disk_is_a_one_line_run_error(tmp_path, monkeypatch, capsys):
    """student_init/ (the copied or pruned student before training): the trainer's path, a RunError (exit 1)."""
    import transformers.modeling_utils as mu

    from pretrain.checkpoint import CheckpointError, CheckpointManager
    from pretrain.export import write_hf_meta
    from pretrain.rundir import RunDir
    from tests import tiny

    tok = tiny.bert_tokenizer()
    student = tiny.bert_model(tok, layers=2)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    ckpt = CheckpointManager(run, rank=0, world_size=1, keep_last=1, save_interval=0, all_ok=lambda ok: ok)

    def full(*a, **k):
        raise ENOSPC

    monkeypatch.setattr(mu, "safe_save_file", full)
    with pytest.raises(CheckpointError) as e:
        ckpt.export_init(student, lambda d: write_hf_meta(d, student.config, tok, {}, "BertForMaskedLM"), {})
    assert str(e.value).startswith(f"could not write export {run.student_init} (OSError: [Errno 28]")
    assert f"nothing was written at {run.student_init}" in str(e.value)
    assert list(run.root.iterdir()) == []  # no temporary folder, no partial student_init/


def test_prepare_on_a_full_disk_is_one_line_keeps_what_resumes_and_resumes(tmp_path, monkeypatch, capsys):
    from data_prep import shards
    from data_prep.__main__ import main as data_prep_main

    a = assets()
    cmd = ["prepare", "--source", f"text:{a['root'] / 'corpus.txt'}", "--tokenizer", str(a["bert"])]
    cmd += ["--max-seq-length", "64", "--output", str(tmp_path / "out"), "--num-proc", "0", "--no-progress"]
    cmd += ["--shard-tokens", "1000", "--batch-chars", "2000"]
    write, calls = shards.ShardWriter.write, []

    def fill_up(self, rows):
        calls.append(1)
        if len(calls) == 6:
            raise ENOSPC
        return write(self, rows)

    monkeypatch.setattr(shards.ShardWriter, "write", fill_up)
    assert data_prep_main(cmd) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not write prepared shards {tmp_path / 'out'} (OSError: [Errno 28]"), err
    assert "MiB are free" in err and "run the same command again to resume" in err and "Traceback" not in err
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "manifest.json" not in left and "prepare-state.npz" in left, left  # nothing looks finished
    assert not [n for n in left if ".tmp-" in n], left
    monkeypatch.undo()
    assert data_prep_main(cmd) == 0
    assert shards.verify(tmp_path / "out")[0] == []


def test_a_report_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import builtins

    import data_prep.files as files
    from pretrain import evaluate

    (tmp_path / "report.md").write_text("old report")
    monkeypatch.setattr(evaluate, "render_markdown", lambda report, png: "new report")

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise ENOSPC

    real_open = builtins.open
    monkeypatch.setattr(files, "open", lambda p, m="r", *a, **k: Full(real_open(p, m, *a, **k)), raising=False)
    with pytest.raises(DiskFullError) as e:
        evaluate.write_report({"meta": {}}, tmp_path)
    assert str(e.value).startswith(f"could not write evaluation report {tmp_path / 'report.md'} (OSError: [Errno 28]")
    assert f"{tmp_path / 'report.md'} is unchanged" in str(e.value) and "it needs about 0.0 MiB" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    assert (tmp_path / "report.md").read_text() == "old report"


# -- no command deletes what it did not write -----------------------------------------------------------------------


def test_export_onto_the_run_directory_is_refused_and_touches_nothing(tiny_run, tmp_path, capsys):
    from pretrain.export import main as export_main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "notes.txt").write_text("my notes")
    before = snapshot(run)
    for extra in ([], ["--overwrite"]):
        assert export_main([str(run / "checkpoints"), str(run), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {run}: contains this command's input") and "even with --overwrite" in err
        assert snapshot(run) == before
    assert export_main([str(run / "checkpoints" / "step_00000002"), str(run), "--overwrite"]) == 2
    assert "contains this command's input" in capsys.readouterr().err and snapshot(run) == before
    other = tmp_path / "other-run"  # another run, not this command's input: refused as a run directory
    shutil.copytree(tiny_run, other)
    assert export_main([str(run / "checkpoints"), str(other), "--overwrite"]) == 2
    assert "holds a training run" in capsys.readouterr().err
    assert export_main([str(run / "checkpoints"), str(run / "checkpoints" / "step_00000002" / "hf")]) == 2
    assert snapshot(run) == before


def test_export_to_new_own_and_foreign_folders(tiny_run, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM

    from pretrain.export import main as export_main

    ckpts = str(tiny_run / "checkpoints")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_main([ckpts, str(empty)]) == 0
    assert json.loads((empty / OUTPUT_MARKER).read_text()) == {"writer": "export"}
    assert export_main([ckpts, str(empty)]) == 0  # its own earlier output
    AutoModelForMaskedLM.from_pretrained(empty)  # the marker does not get in the loader's way
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes")
    assert export_main([ckpts, str(foreign)]) == 2
    err = capsys.readouterr().err
    assert f"{foreign}: a non-empty folder this command did not write" in err and "--overwrite" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert export_main([ckpts, str(foreign), "--overwrite"]) == 0
    assert not (foreign / "notes.txt").exists() and (foreign / "model.safetensors").is_file()


def test_legacy_exports_count_as_own_output_and_the_guard_rules(tmp_path):
    legacy = tmp_path / "student"
    legacy.mkdir()
    (legacy / "distill_export.json").write_text("{}")  # an export written before the marker existed
    check_replaceable(legacy, kind="export")
    with pytest.raises(OutputExistsError, match="did not write"):
        check_replaceable(legacy, kind="output")
    with pytest.raises(OutputExistsError, match="contains this command's input"):
        check_replaceable(tmp_path, kind="export", overwrite=True, inputs=[legacy / "x"])
    with pytest.raises(OutputExistsError, match="home folder"):
        check_replaceable(Path.home(), kind="export", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_replaceable(tmp_path / "file", kind="export", overwrite=True)


def test_prepare_refuses_a_run_directory_as_output(tiny_run, tmp_path, capsys):
    from data_prep.__main__ import main as data_prep_main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    a = assets()
    cmd = ["prepare", "--source", f"text:{a['root'] / 'corpus.txt'}", "--tokenizer", str(a["bert"])]
    cmd += ["--max-seq-length", "64", "--output", str(run), "--num-proc", "0", "--no-progress", "--overwrite"]
    assert data_prep_main(cmd) == 2
    assert "holds a training run" in capsys.readouterr().err and snapshot(run) == before


# -- the free-space preflight ---------------------------------------------------------------------------------------


def test_preflight_warns_naming_the_folder_when_the_run_will_not_fit(tmp_path, monkeypatch, capsys):
    from pretrain.checkpoint import CheckpointManager, estimate_checkpoint_bytes
    from pretrain.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.root.mkdir()

    def manager() -> CheckpointManager:
        return CheckpointManager(run, rank=0, world_size=1, keep_last=2, save_interval=10, all_ok=lambda ok: ok)

    ckpt = estimate_checkpoint_bytes(10_000_000, weight_bytes=2, fp32_master=True)
    assert ckpt == 10_000_000 * 14  # bf16 weights + two fp32 moments + the fp32 master
    # the run writes 3 checkpoints (keep_last 2, + 1 while the newest is written) and two exports: 500,000,000 bytes
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**40, 2**40 - 2**29, 2**29))
    assert manager().preflight_space(ckpt, 40_000_000) is None and capsys.readouterr().err == ""
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**40, 2**40 - 2**27, 2**27))
    msg = manager().preflight_space(ckpt, 40_000_000)
    assert msg is not None and msg.startswith(f"{run.root}: the run will write about 476.8 MiB")
    assert "128.0 MiB are available" in msg and "train.keep_last 2" in msg
    assert capsys.readouterr().err == f"[pretrain] WARNING: {msg}\n"
    m = manager()
    m.preflight_space(ckpt, 40_000_000)
    assert m.preflight_space(ckpt, 40_000_000) is None  # once per run


def test_the_checkpoint_estimate_is_close_to_the_tiny_runs_checkpoint(tiny_run):
    from safetensors.torch import load_file

    from pretrain.checkpoint import estimate_checkpoint_bytes

    trainable = sum(v.numel() for v in load_file(tiny_run / "student" / "model.safetensors").values())
    written = sum(p.stat().st_size for p in (tiny_run / "checkpoints" / "step_00000002").rglob("*") if p.is_file())
    estimate = estimate_checkpoint_bytes(trainable)  # ZeRO-2, fp32: weights + moments + master = 16 bytes
    assert 0.85 * written < estimate < written, (estimate, written)


def test_export_names_the_kept_tags_when_a_tag_is_gone(tmp_path):
    """README once exported --tag step_00002500, which keep_last: 3 deletes by step 5,000 (issue 24 item 11)."""
    from pretrain.export import resolve_tag_dir

    ckpts = tmp_path / "checkpoints"
    for step in (4500, 4750, 5000):
        (ckpts / f"step_{step:08d}" / "hf").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        resolve_tag_dir(ckpts, "step_00002500")
    assert "no checkpoint 'step_00002500' (train.keep_last deletes older ones)" in str(e.value)
    assert "['step_00004500', 'step_00004750', 'step_00005000']" in str(e.value)
    assert resolve_tag_dir(ckpts, "step_00005000") == ckpts / "step_00005000"
