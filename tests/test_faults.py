"""Faults found when the landed pipeline was tried (issue 12), each with a test that failed before its fix: a torn
metrics line, a full disk while saving, an error on one rank during resume, a missing valid split, a stop signal
before an evaluation, a second run on a live run directory, the bare encoder's pooler in the export, the torch
minimum, and MFU in the metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from pretrain.config import load
from pretrain.schema import ConfigError
from tests.helpers import (
    PY,
    REPO,
    assets,
    env,
    read_metrics,
    run_cmd,
    tiny_overrides,
    train_in_process,
    wait_for_step,
)

TINY = REPO / "configs" / "tiny-cpu.json"


def test_torn_metrics_line_does_not_break_the_resume(tmp_path):
    out = tmp_path / "run"
    over = tiny_overrides(
        "bert", out, steps=2, **{"train.save_interval": 2, "train.eval_interval": 0, "train.export_init": False}
    )
    train_in_process(load(TINY, over))
    with open(out / "metrics.jsonl", "a") as f:  # a process killed mid-write
        f.write('{"split": "train", "step": 3, "loss": 1.2')
    train_in_process(load(TINY, [*over, "train.max_steps=4"]))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole: the torn one is gone
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]


def _checkpoint_bytes(tmp_path) -> int:
    out = tmp_path / "measure"
    train_in_process(
        load(
            TINY,
            tiny_overrides(
                "bert",
                out,
                steps=2,
                **{
                    "train.save_interval": 2,
                    "train.eval_interval": 0,
                    "train.export_init": False,
                    "train.evaluate": False,
                },
            ),
        )
    )
    return sum(p.stat().st_size for p in (out / "checkpoints" / "step_00000002").rglob("*") if p.is_file())


def test_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    size = _checkpoint_bytes(tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    limit = int(size * 1.6) + 256 * 1024  # room for one checkpoint, the logs and the lock: not for a second one
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={limit}", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = disk / "run"
        over = tiny_overrides(
            "bert",
            out,
            steps=6,
            **{
                "train.save_interval": 2,
                "train.eval_interval": 0,
                "train.export_init": False,
                "train.keep_last": 1,
                "train.tensorboard": False,
            },
        )
        cmd = [PY, "launch/pretrain.py", "--config", str(TINY), *over]
        for attempt in range(2):  # the rerun resumes from the intact checkpoint and fails the same clear way
            r = run_cmd(cmd)
            err = r.stdout + r.stderr
            assert r.returncode == 1, err
            assert "Traceback" not in err and "could not write checkpoint" in err, err
            assert "MiB are free" in err and "step_00000002 is intact" in err, err
            assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
            assert not (out / "checkpoints" / "step_00000004").exists()  # the partial save is removed
            if attempt:
                assert f"resumed from {out / 'checkpoints' / 'step_00000002'}" in r.stdout
    finally:
        subprocess.run(["umount", str(disk)])


def test_full_disk_while_saving_without_root_via_injected_enospc(tmp_path):
    """The tmpfs test above without root: the entry point runs with ENOSPC injected into torch.save (DeepSpeed's
    writer) for the second checkpoint. Exit 1, one line, the last complete checkpoint intact and resumed from."""
    script = tmp_path / "full_disk.py"
    script.write_text(
        "import errno, sys, torch\n"
        "save = torch.save\n"
        "def full(obj, f, *a, **k):\n"
        "    if 'step_00000004' in str(f):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return save(obj, f, *a, **k)\n"
        "torch.save = full\n"
        "from pretrain.main import main\n"
        "sys.exit(main())\n"
    )
    out = tmp_path / "run"
    over = tiny_overrides(
        "bert",
        out,
        steps=6,
        **{
            "train.save_interval": 2,
            "train.eval_interval": 0,
            "train.export_init": False,
            "train.keep_last": 1,
            "train.tensorboard": False,
        },
    )
    for attempt in range(2):  # the rerun resumes from the intact checkpoint and fails the same clear way
        r = run_cmd([PY, str(script), "--config", str(TINY), *over])
        err = r.stdout + r.stderr
        assert r.returncode == 1, err
        lines = [x for x in err.splitlines() if "error:" in x]
        assert len(lines) == 1 and "Traceback" not in err, err
        tag4 = out / "checkpoints" / "step_00000004"
        assert lines[0].startswith(f"[rank 0] error: could not write checkpoint {tag4} (OSError: [Errno 28]"), err
        assert "MiB are free" in err and "step_00000002 is intact" in err, err
        assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
        assert not tag4.exists()  # the partial save is removed
        if attempt:
            assert f"resumed from {out / 'checkpoints' / 'step_00000002'}" in r.stdout


def test_an_error_on_rank0_reaches_the_other_rank(tmp_path):
    """on_rank0: an unexpected exception on rank 0 (a KeyError) ends rank 1 at once with rank 0's message, instead of
    leaving it blocked in the broadcast; an expected type is re-raised as that type on every rank."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, sys, torch.distributed as dist\n"
        "from pretrain.runtime import RankFailed, on_rank0\n"
        "from pretrain.schema import ConfigError\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "def boom():\n    raise KeyError('files')\n"
        "def config_error():\n    raise ConfigError('train.output_dir: bad')\n"
        "try:\n    on_rank0(boom, rank=rank)\n"
        "except RankFailed as e:\n    print(f'rank {rank}: RankFailed: {e}')\n"
        "except KeyError as e:\n    print(f'rank {rank}: KeyError {e}')\n"
        "try:\n    on_rank0(config_error, rank=rank, expected=(ConfigError,))\n"
        "except ConfigError as e:\n    print(f'rank {rank}: ConfigError: {e}')\n"
        "print(f'rank {rank}: answer', on_rank0(lambda: 41 + 1, rank=rank))\n"
    )
    port = str(29500 + os.getpid() % 1000)
    procs = [
        subprocess.Popen(
            [PY, str(script)],
            env=env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert "rank 0: KeyError 'files'" in outs[0]
    assert "rank 1: RankFailed: rank 0 failed: KeyError: 'files'" in outs[1]
    assert all(f"rank {r}: ConfigError: train.output_dir: bad" in outs[r] for r in (0, 1))
    assert all(f"rank {r}: answer 42" in outs[r] for r in (0, 1))


@pytest.mark.parametrize("case", ["missing", "fewer_than_ranks_or_empty"])
def test_valid_split_problems_are_refused_at_start(case, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(assets()["shards-bert"], shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    if case == "missing":
        manifest["splits"].pop("valid")
        pattern = r"data\.dir: .*no usable valid split.*--valid-fraction.*train\.evaluate=false"
    else:
        manifest["splits"]["valid"].update(num_sequences=0, num_tokens=0, shards=[])
        pattern = r"data\.dir: .*no sequences in split 'valid'.*train\.evaluate=false"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "run"
    over = tiny_overrides("bert", out, steps=2, **{"data.dir": str(shards), "train.eval_interval": 0})
    with pytest.raises(ConfigError, match=pattern):
        train_in_process(load(TINY, over))
    assert not (out / "checkpoints").exists()
    train_in_process(load(TINY, [*over, "train.evaluate=false"]))  # without evaluation the run goes on
    assert read_metrics(out, "valid") == [] and read_metrics(out)[-1]["step"] == 2


def test_stop_signal_saves_before_the_due_evaluation(tmp_path):
    out = tmp_path / "run"
    over = tiny_overrides(
        "bert",
        out,
        steps=400,
        **{"train.save_interval": 0, "train.eval_interval": 1, "train.eval_sequences": 8, "train.export_init": False},
    )
    order = []

    def watch(trainer):
        save, evaluate = trainer.save, trainer.evaluate
        trainer.save = lambda: (order.append(("save", trainer.step)), save())[1]
        trainer.evaluate = lambda: (order.append(("evaluate", trainer.step)), evaluate())[1]
        step_once = trainer.step_once

        def stop_at_3(*a, **k):
            if trainer.step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)
            return step_once(*a, **k)

        trainer.step_once = stop_at_3

    train_in_process(load(TINY, over), before_fit=watch)
    assert order[-2:] == [("save", 3), ("evaluate", 3)], order
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"


def test_second_run_on_a_live_run_directory_is_refused_naming_the_holder(tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    # long enough to be still running when the second one starts (a tiny step takes milliseconds on a quiet machine)
    over = tiny_overrides(
        "bert",
        out,
        steps=10**6,
        **{
            "train.save_interval": 0,
            "train.eval_interval": 0,
            "deepspeed.scheduler.params.total_num_steps": 10**6,
            "train.export_init": False,
        },
    )
    cmd = [PY, "launch/pretrain.py", "--config", str(TINY), *over]
    with open(log, "w") as f:
        first = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            wait_for_step(out, 1, first, log)
            t0 = time.time()
            r = run_cmd(cmd)
            assert r.returncode == 2, r.stdout + r.stderr
            assert "is in use by a live run" in r.stderr and f"pid {first.pid}" in r.stderr, r.stderr
            assert time.time() - t0 < 60 and "Traceback" not in r.stderr
        finally:
            first.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
            first.wait(timeout=60)
    assert json.loads((out / ".lock").read_text())["pid"] == first.pid  # the stale lock file is still there
    r = run_cmd([*cmd, "train.max_steps=2", "deepspeed.scheduler.params.total_num_steps=2"])
    assert r.returncode == 0, r.stdout + r.stderr  # ... and does not block the next run


def test_bare_encoder_export_has_the_teachers_pooler_and_loads_silently(tmp_path, caplog):
    from safetensors.torch import load_file
    from transformers import AutoModel, BertModel

    out, teacher = tmp_path / "run", tmp_path / "teacher"
    shutil.copytree(assets()["bert-nohead"], teacher)  # a sentence encoder whose checkpoint has a pooler, as
    encoder = BertModel.from_pretrained(assets()["bert-nohead"], add_pooling_layer=True)  # all-MiniLM-L6-v2's
    torch.nn.init.normal_(encoder.pooler.dense.weight)
    encoder.save_pretrained(teacher)
    cfg = load(
        TINY,
        tiny_overrides(
            "bert",
            out,
            steps=2,
            **{
                "teacher.name_or_path": str(teacher),
                "loss.alpha_ce": 0.0,
                "loss.alpha_mlm": 0.0,
                "loss.alpha_cos": 1.0,
                "train.eval_interval": 0,
            },
        ),
    )
    train_in_process(cfg)
    t_state = load_file(str(teacher / "model.safetensors"))
    assert "pooler.dense.weight" in t_state
    for d in ("student_init", "student"):
        s_state = load_file(str(out / d / "model.safetensors"))
        for k in ("pooler.dense.weight", "pooler.dense.bias"):  # frozen: no loss reaches it
            assert torch.equal(s_state[k], t_state[k]), (d, k)
        _, info = AutoModel.from_pretrained(out / d, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_torch_minimum_is_checked_with_a_clear_message():
    from pretrain.runtime import MIN_TORCH, check_torch

    check_torch(torch.__version__)
    check_torch("2.6.0+cu124")
    from pretrain.runtime import RunError

    with pytest.raises(RunError, match=r"torch 2\.5\.1 is installed; this project needs torch >= 2\.6"):
        check_torch("2.5.1")
    assert MIN_TORCH == (2, 6) and hasattr(torch.nn.utils, "get_total_norm")


def test_train_records_carry_model_flops_and_mfu(tmp_path):
    from pretrain.flops import step_flops

    out = tmp_path / "run"
    trainer = train_in_process(
        load(TINY, tiny_overrides("bert", out, steps=3, **{"train.eval_interval": 0, "train.export_init": False}))
    )
    recs = read_metrics(out)
    for r in recs:
        assert r["model_flops_per_s"] > 0 and 0 < r["mfu"] < 1.5, r
    # one step: 2 micro-batches [2, L]; the heads run on the masked rows of both
    r = recs[-1]
    seq = 64  # the tiny shards' sequences are packed to 64 tokens
    per_batch = step_flops(trainer.model, sequences=2, seq_len=seq, head_positions=0)["total"]
    head = step_flops(trainer.model, sequences=0, seq_len=0, head_positions=1)["total"]
    masked = r["masked_tokens_seen"] - recs[-2]["masked_tokens_seen"]
    expected = 2 * per_batch + masked * head
    assert r["model_flops_per_s"] * r["seconds_per_step"] == pytest.approx(expected, rel=1e-6)


def test_narrow_students_sentence_transformers_pooling_has_the_students_width(tmp_path):
    from transformers import BertConfig

    from pretrain.export import write_hf_meta

    teacher = assets()["bert-nohead"]
    files = {"modules.json": teacher / "modules.json", "1_Pooling/config.json": teacher / "1_Pooling" / "config.json"}
    assert json.loads(files["1_Pooling/config.json"].read_text())["word_embedding_dimension"] == 32
    narrow = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    from tests import tiny

    write_hf_meta(tmp_path / "out", narrow, tiny.bert_tokenizer(), files, "BertModel")
    assert json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 16
    assert json.loads(files["1_Pooling/config.json"].read_text())["word_embedding_dimension"] == 32  # source intact
