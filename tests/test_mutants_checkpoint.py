"""Kill tests for mutants of pretrain/checkpoint.py (docs/testing.md "Mutation testing"; docs/mutants-checkpoint.md:
of the 463 mutants its first mutmut run did not kill, these tests kill 460, the other 3 are equivalent).

Fast unit tests of the checkpoint manager without DeepSpeed or training: a fake engine writes the files DeepSpeed would
into the tag folder and records its calls, ``all_ok`` is a recorder standing for the collective, the free space comes
from a patched ``shutil.disk_usage``, ``torch.cuda``'s functions are stood in for to test the CUDA RNG branch on CPU.
Expected values are written out here: tag names, which steps save, the manifest's text with sha256 computed with
hashlib, which tags pruning keeps, ``verify`` / ``find_resume`` messages, the sizes the free-space check is given, the
RNG draws after a round trip, export calls.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import pretrain.checkpoint as ck
from data_prep.errors import DiskFullError, OutputExistsError
from data_prep.files import MIB
from pretrain.checkpoint import MANIFEST, CheckpointError, CheckpointManager
from pretrain.rundir import RunDir
from pretrain.schema import ConfigError

Usage = namedtuple("Usage", "total used free")


class Ok:
    """``all_ok`` of one rank: records each call; answers ``answers`` in turn, then the rank's own ``ok``."""

    def __init__(self, answers: list[bool] | None = None):
        self.calls: list[Any] = []
        self.answers = list(answers or [])

    def __call__(self, ok):
        self.calls.append(ok)
        return self.answers.pop(0) if self.answers else ok


class FakeEngine:
    """What CheckpointManager uses of a DeepSpeed engine: ``module``, ``zero_optimization_stage()``, and
    ``save_checkpoint`` (writes a model-states and an optimizer file into the tag folder, or raises ``fail``)."""

    def __init__(self, module: nn.Module | None = None, stage: Any = 2, fail: BaseException | None = None):
        self.module = module if module is not None else nn.Linear(2, 2)
        self.stage, self.fail = stage, fail
        self.calls: list[tuple] = []

    def zero_optimization_stage(self):
        return self.stage

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        self.calls.append((save_dir, tag, client_state, save_latest))
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(json.dumps(client_state).encode())
        if self.fail is not None:
            raise self.fail
        (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim" * 7)


def manager(tmp_path: Path, *, rank=0, world_size=1, keep_last=2, save_interval=5, all_ok=None) -> CheckpointManager:
    run = RunDir(tmp_path / "run")
    run.root.mkdir(exist_ok=True)
    return CheckpointManager(
        run, rank=rank, world_size=world_size, keep_last=keep_last, save_interval=save_interval, all_ok=all_ok or Ok()
    )


def write_tag(root: Path, step: int, files: dict[str, bytes], *, world_size=1, config=None, manifest=True) -> Path:
    """A tag folder holding ``files``, with a correct checkpoint.json unless ``manifest`` is False."""
    folder = root / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    if manifest:
        listed = {n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()}
        text = {"step": step, "tag": folder.name, "world_size": world_size, "files": listed, "config": config}
        (folder / MANIFEST).write_text(json.dumps(text))
    return folder


def sizes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def big_disk(monkeypatch):
    """Plenty of free space (1 TiB) for every path."""
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(2 << 40, 1 << 40, 1 << 40))


@pytest.fixture
def warnings(monkeypatch):
    seen: list[Any] = []
    monkeypatch.setattr("pretrain.runtime.warn", seen.append)
    return seen


@pytest.fixture
def rng_restored():
    state = ck.rng_state()
    yield
    ck.set_rng_state(state)


# -- small functions -------------------------------------------------------------------------------------------


def test_tag_names_and_list_tags_newest_first(tmp_path):
    assert ck.tag_for(1000) == "step_00001000"
    assert ck.list_tags(tmp_path / "absent") == []
    for name in ("step_00000002", "step_00000010", "step_5", "step_x", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_00000007").write_text("a file, not a tag")
    (tmp_path / "latest").write_text("step_00000010")
    assert ck.list_tags(tmp_path) == [(10, "step_00000010"), (5, "step_5"), (2, "step_00000002")]


def test_should_save_at_the_interval_the_last_step_and_on_stop(tmp_path):
    mgr = manager(tmp_path, save_interval=5)
    assert mgr.last_saved is None
    assert [s for s in range(1, 13) if mgr.should_save(s, last=False, stopping=False)] == [5, 10]
    assert mgr.should_save(7, last=True, stopping=False)
    assert mgr.should_save(3, last=False, stopping=True)
    never = manager(tmp_path, save_interval=0)
    assert [s for s in range(12) if never.should_save(s, last=False, stopping=False)] == []
    assert never.should_save(4, last=True, stopping=False) and never.should_save(4, last=False, stopping=True)


def test_estimate_checkpoint_bytes_exact():
    assert ck.estimate_checkpoint_bytes(1000) == 16000  # fp32 weights + 2 moments + fp32 master
    assert ck.estimate_checkpoint_bytes(1000, 7, weight_bytes=2) == 14007
    assert ck.estimate_checkpoint_bytes(1000, 7, weight_bytes=2, fp32_master=False) == 10007
    assert ck.estimate_checkpoint_bytes(10, 3, weight_bytes=4, fp32_master=False) == 123


def test_folder_bytes_counts_nested_files(tmp_path):
    (tmp_path / "sub" / "empty").mkdir(parents=True)
    (tmp_path / "a").write_bytes(b"123")
    (tmp_path / "sub" / "b").write_bytes(b"12345")
    assert ck._folder_bytes(tmp_path) == 8


def test_atomic_torch_save_round_trip_and_full_disk(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    ck.atomic_torch_save({"a": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["a"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]

    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match=r"^could not write checkpoint file .*x\.pt \(OSError"):
        ck.atomic_torch_save({"a": 1}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def _seed():
    torch.manual_seed(5)
    random.seed(6)
    np.random.seed(7)


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def test_rng_state_round_trip(rng_restored):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ck.rng_state()
    assert set(state) == {"python", "numpy", "torch"}  # no CUDA here
    first = _draws()
    assert _draws() != first
    ck.set_rng_state(state)
    assert _draws() == first


def test_set_rng_state_skips_cuda_without_a_device(rng_restored):
    state = dict(ck.rng_state(), cuda="not a CUDA state")
    first = _draws()
    ck.set_rng_state(state)  # no CUDA: the entry is ignored
    assert _draws() == first


def test_rng_state_with_a_cuda_device(monkeypatch, rng_restored):
    """The CUDA branch, with torch.cuda's functions stood in for (these tests run without a GPU)."""
    cuda_state = torch.tensor([1, 2, 3], dtype=torch.uint8)
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: cuda_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    assert set(ck.rng_state()) == {"python", "numpy", "torch"}  # CUDA not initialised: no state to save
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    state = ck.rng_state()
    assert set(state) == {"python", "numpy", "torch", "cuda"} and state["cuda"] is cuda_state
    ck.set_rng_state(state)
    assert restored == [cuda_state]
    ck.set_rng_state({k: v for k, v in state.items() if k != "cuda"})
    assert restored == [cuda_state]


def test_load_rng_restores_this_ranks_states(tmp_path, rng_restored):
    mgr = manager(tmp_path, rank=1)
    (mgr.root / "step_00000004").mkdir(parents=True)
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    ck.atomic_torch_save(ck.rng_state(), mgr.root / "step_00000004" / "rng_rank_00001.pt")
    first = _draws()
    assert mgr.load_rng("step_00000004") is True
    assert _draws() == first
    assert mgr.load_rng("step_00000009") is False
    assert manager(tmp_path, rank=2).load_rng("step_00000004") is False


# -- verify and find_resume ------------------------------------------------------------------------------------


def test_verify_good_and_each_fault(tmp_path):
    files = {"a.pt": b"12345", "hf/config.json": b"{}"}
    good = write_tag(tmp_path, 3, files, world_size=2, config={"k": 1})
    manifest = ck.verify(good)
    assert manifest == {
        "step": 3,
        "tag": "step_00000003",
        "world_size": 2,
        "files": {n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()},
        "config": {"k": 1},
    }
    (good / "a.pt").write_bytes(b"123")
    with pytest.raises(ValueError, match=r"^a\.pt has 3 bytes, the manifest says 5$"):
        ck.verify(good)
    (good / "a.pt").write_bytes(b"12346")
    with pytest.raises(ValueError, match=r"^a\.pt does not match its sha256 \(corrupted\)$"):
        ck.verify(good)
    (good / "a.pt").write_bytes(b"12345")
    (good / "hf" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"^hf/config\.json is missing$"):
        ck.verify(good)
    (good / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"^no checkpoint\.json: the save did not finish$"):
        ck.verify(good)
    (good / MANIFEST).write_text("{")
    with pytest.raises(ValueError, match=r"^unreadable checkpoint\.json: "):
        ck.verify(good)


@pytest.mark.parametrize(
    "manifest",
    [
        [],
        {"step": 1, "world_size": 1},
        {"step": 1, "world_size": 1, "files": []},
        {"step": "1", "world_size": 1, "files": {}},
        {"step": 1, "files": {}},
        {"step": 1, "world_size": 1, "files": {"a": "x"}},
        {"step": 1, "world_size": 1, "files": {"a": {"sha256": "0"}}},
        {"step": 1, "world_size": 1, "files": {"a": {"bytes": 1, "sha256": 0}}},
        {"step": 1, "world_size": 1, "files": {"a": {"bytes": 1}}},
    ],
)
def test_verify_malformed_manifest(tmp_path, manifest):
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"^malformed checkpoint\.json \(expected step, world_size and files"):
        ck.verify(tmp_path)


def test_find_resume_takes_the_newest_complete_tag_and_names_the_skipped(tmp_path):
    mgr = manager(tmp_path)
    assert mgr.find_resume() == (None, None, [])
    write_tag(mgr.root, 5, {"a.pt": b"five"})
    write_tag(mgr.root, 10, {"a.pt": b"ten"})
    corrupt = write_tag(mgr.root, 20, {"a.pt": b"twenty"})
    (corrupt / "a.pt").write_bytes(b"twentY")
    write_tag(mgr.root, 30, {"a.pt": b"thirty"}, manifest=False)
    tag, manifest, notes = mgr.find_resume()
    assert (tag, manifest) == ("step_00000010", ck.verify(mgr.root / "step_00000010"))
    assert notes == [
        f"skipping checkpoint {mgr.root / 'step_00000030'}: no checkpoint.json: the save did not finish",
        f"skipping checkpoint {mgr.root / 'step_00000020'}: a.pt does not match its sha256 (corrupted)",
    ]


def test_find_resume_refuses_when_no_tag_is_complete(tmp_path):
    mgr = manager(tmp_path)
    write_tag(mgr.root, 30, {"a.pt": b"thirty"}, manifest=False)
    with pytest.raises(ValueError, match=r"holds checkpoints but none is complete \(skipping checkpoint .*30: no "):
        mgr.find_resume()


# -- resume_point ----------------------------------------------------------------------------------------------

MINE = {"student": {"layers": 2}, "teacher": {"name_or_path": "t"}}


def _point(mgr, mine, allow=False) -> tuple[str, dict]:
    point = mgr.resume_point(mine, allow_world_size_change=allow)
    assert point is not None
    return point


def _spy_space(mgr, monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(mgr, "preflight_space", lambda c, e: calls.append((c, e)))
    return calls


def test_resume_point_fresh_run(tmp_path, monkeypatch, warnings):
    mgr = manager(tmp_path)
    space = _spy_space(mgr, monkeypatch)
    assert mgr.resume_point(MINE, allow_world_size_change=False) is None
    assert mgr._config is MINE and space == [] and warnings == []


def test_resume_point_same_run(tmp_path, monkeypatch, warnings):
    mgr = manager(tmp_path, world_size=2)
    files = {"mp_rank_00_model_states.pt": b"7 bytes", "b.pt": b"123", "hf/c": b"12345"}
    write_tag(mgr.root, 10, files, world_size=2, config=MINE)
    write_tag(mgr.root, 20, {"a.pt": b"x"}, manifest=False)
    space = _spy_space(mgr, monkeypatch)
    tag, manifest = _point(mgr, MINE)
    assert (tag, manifest) == ("step_00000010", ck.verify(mgr.root / tag))
    assert mgr._config is MINE
    assert warnings == [
        f"skipping checkpoint {mgr.root / 'step_00000020'}: no checkpoint.json: the save did not finish"
    ]
    assert space == [(15, 7)]  # the checkpoint's bytes; the model states stand for the export
    (mgr.run.student_init / "sub").mkdir(parents=True)
    (mgr.run.student_init / "w").write_bytes(b"1" * 11)
    (mgr.run.student_init / "sub" / "v").write_bytes(b"1" * 13)
    assert _point(mgr, MINE)[0] == tag
    assert space[1] == (15, 24)  # student_init/ measured


def test_resume_point_without_model_states_file(tmp_path, monkeypatch, warnings):
    mgr = manager(tmp_path)
    write_tag(mgr.root, 10, {"b.pt": b"123"}, config=MINE)
    space = _spy_space(mgr, monkeypatch)
    assert _point(mgr, MINE)[0] == "step_00000010"
    assert space == [(3, 0)]


def test_resume_point_world_size_change(tmp_path, monkeypatch, warnings):
    mgr = manager(tmp_path, world_size=1)
    write_tag(mgr.root, 10, {"b.pt": b"123"}, world_size=2, config=MINE)
    _spy_space(mgr, monkeypatch)
    with pytest.raises(ConfigError, match=r"^train\.allow_world_size_change: checkpoint .* written by 2 rank\(s\)"):
        mgr.resume_point(MINE, allow_world_size_change=False)
    assert _point(mgr, MINE, allow=True)[0] == "step_00000010"


def test_resume_point_refuses_another_run_and_incomplete_tags(tmp_path, monkeypatch, warnings):
    mgr = manager(tmp_path)
    write_tag(mgr.root, 10, {"b.pt": b"123"}, config=MINE)
    _spy_space(mgr, monkeypatch)
    other = {"student": {"layers": 3}, "teacher": {"name_or_path": "t"}}
    with pytest.raises(ConfigError, match=r"^train\.output_dir: .* holds checkpoints of another run"):
        mgr.resume_point(other, allow_world_size_change=True)
    (mgr.root / "step_00000010" / MANIFEST).unlink()
    with pytest.raises(ConfigError, match=r"^train\.output_dir: .* holds checkpoints but none is complete"):
        mgr.resume_point(MINE, allow_world_size_change=True)


# -- free space ------------------------------------------------------------------------------------------------


def _held(mgr) -> int:
    """3.5 MiB already in checkpoints/, student_init/ and student/ (sparse files)."""
    for folder, size in (
        (mgr.root / "step_00000001", 2 * MIB),
        (mgr.run.student_init, MIB),
        (mgr.run.student, MIB // 2),
    ):
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "f", "wb") as f:
            f.truncate(size)
    return 7 * MIB // 2


def _disk(monkeypatch, free):
    seen: list[Any] = []

    def usage(p):
        seen.append(Path(p))
        if free is None:
            raise OSError(errno.EIO, "unreadable")
        return Usage(1 << 40, 0, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return seen


def test_preflight_space_thresholds_and_message(tmp_path, monkeypatch, warnings):
    planned = 3 * MIB * 3 + (3 * MIB // 2) * 2  # 3 MiB x (keep_last 2 + 1) + 1.5 MiB x 2 = 12 MiB
    mgr = manager(tmp_path, keep_last=2)
    held = _held(mgr)
    seen = _disk(monkeypatch, planned - held)
    assert mgr.preflight_space(3 * MIB, 3 * MIB // 2) is None  # exactly enough
    assert seen == [mgr.run.root]
    short = manager(tmp_path, keep_last=2)
    _disk(monkeypatch, planned - held - 1)
    msg = short.preflight_space(3 * MIB, 3 * MIB // 2)
    assert msg == (
        f"{short.run.root}: the run will write about 12.0 MiB (checkpoints of about 3.0 MiB x train.keep_last 2 + 1, "
        f"and the student_init/ and student/ exports of 1.5 MiB each) and 12.0 MiB are available on that file "
        f"system; free space, lower train.keep_last, or choose another train.output_dir"
    )
    assert warnings == [msg]
    assert short.preflight_space(3 * MIB, 3 * MIB // 2) is None  # once per manager
    assert warnings == [msg]


def test_preflight_space_only_rank_0_and_unknown_free_space(tmp_path, monkeypatch, warnings):
    _disk(monkeypatch, 0)
    assert manager(tmp_path, rank=1).preflight_space(MIB, MIB) is None
    _disk(monkeypatch, None)
    assert manager(tmp_path).preflight_space(MIB, MIB) is None
    assert warnings == []


class Frozen(nn.Module):
    def __init__(self, trainable: list[torch.Tensor], frozen: list[torch.Tensor], buffers: list[torch.Tensor]):
        super().__init__()
        self.t = nn.ParameterList([nn.Parameter(x) for x in trainable])
        self.f = nn.ParameterList([nn.Parameter(x, requires_grad=False) for x in frozen])
        for i, b in enumerate(buffers):
            self.register_buffer(f"b{i}", b)


def _engine_space(tmp_path, monkeypatch, engine):
    mgr = manager(tmp_path)
    calls: list[tuple] = []

    def space(checkpoint_bytes, export_bytes):
        calls.append((checkpoint_bytes, export_bytes))
        return "checked"

    monkeypatch.setattr(mgr, "preflight_space", space)
    assert mgr.preflight_engine(engine) == "checked"
    return calls


def test_preflight_engine_sizes(tmp_path, monkeypatch):
    fp32 = Frozen([torch.zeros(2, 3), torch.zeros(2)], [torch.zeros(5)], [torch.zeros(3, dtype=torch.int64)])
    # 8 trainable fp32 (4 + 8 bytes each, no master copy at ZeRO-0 fp32), 20 + 24 bytes frozen / buffers
    assert _engine_space(tmp_path, monkeypatch, FakeEngine(fp32, stage=0)) == [(8 * 12 + 44, 32)]
    assert _engine_space(tmp_path, monkeypatch, FakeEngine(fp32, stage=1)) == [(8 * 16 + 44, 32)]
    assert _engine_space(tmp_path, monkeypatch, FakeEngine(fp32, stage=None)) == [(8 * 12 + 44, 32)]
    assert _engine_space(tmp_path, monkeypatch, fp32) == [(8 * 12 + 44, 32)]  # a bare module: ZeRO-0
    half = Frozen([torch.zeros(6, dtype=torch.float16), torch.zeros(4)], [torch.zeros(10)], [])
    half.t[0].ds_numel = 100  # ZeRO-3 partitions count ds_numel
    half.f[0].ds_numel = 50
    # weight bytes from the first trainable (fp16: 2, so a fp32 master copy): 104 x (2 + 8 + 4) + 50 x 4
    assert _engine_space(tmp_path, monkeypatch, FakeEngine(half, stage=0)) == [(104 * 14 + 200, 416)]
    none = Frozen([], [torch.zeros(3)], [])
    assert _engine_space(tmp_path, monkeypatch, FakeEngine(none, stage=0)) == [(12, 0)]


def test_preflight_engine_runs_once(tmp_path, monkeypatch):
    mgr = manager(tmp_path)
    mgr._preflight_done = True
    assert mgr.preflight_engine(object()) is None


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(6))
        self.b = nn.Parameter(torch.zeros(10), requires_grad=False)


@pytest.mark.parametrize(
    "config, expected",
    [
        ({}, 6 * 12 + 40),
        ({"deepspeed": None}, 6 * 12 + 40),
        ({"deepspeed": {"fp16": {"enabled": True}}}, 6 * 14 + 40),
        ({"deepspeed": {"bf16": {"enabled": True}, "fp16": {"enabled": False}}}, 6 * 14 + 40),
        ({"deepspeed": {"fp16": None, "zero_optimization": {"stage": None}}}, 6 * 12 + 40),
        ({"deepspeed": {"zero_optimization": {"stage": 1}}}, 6 * 16 + 40),
    ],
)
def test_estimate_from_the_resolved_config(tmp_path, config, expected):
    mgr = manager(tmp_path)
    if config:
        mgr._config = config
    assert mgr._estimate_from(Student()) == (expected, 64)


# -- save ------------------------------------------------------------------------------------------------------

CLIENT = {"step": 10, "config": {"student": {"layers": 2}}}


def _spy_writes(monkeypatch):
    calls: list[tuple] = []
    real = ck.atomic_write_text

    def spy(path, text, *args, what="(default)", **kw):
        calls.append((Path(path), text, what))
        return real(path, text, *args, what=what, **kw)

    monkeypatch.setattr(ck, "atomic_write_text", spy)
    return calls


def test_save_rank_0_writes_files_manifest_and_latest(tmp_path, monkeypatch, big_disk, rng_restored):
    ok = Ok()
    mgr = manager(tmp_path, world_size=2, all_ok=ok)
    stale = mgr.root / "step_00000010" / "stale.bin"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from a cut-off save")
    writes = _spy_writes(monkeypatch)
    extra: list[Path] = []

    def write_extra(folder):
        extra.append(folder)
        (folder / "hf").mkdir()
        (folder / "hf" / "config.json").write_text('{"a": 1}')

    engine = FakeEngine()
    _seed()
    tag_dir = mgr.save(engine, 10, CLIENT, write_extra)
    assert tag_dir == mgr.root / "step_00000010"
    assert engine.calls == [(str(mgr.root), "step_00000010", CLIENT, False)]
    assert extra == [tag_dir]
    assert ok.calls == [True, True, True]
    assert mgr.last_saved == 10
    ck.set_rng_state(torch.load(tag_dir / "rng_rank_00000.pt", weights_only=False))
    restored = _draws()
    _seed()
    assert restored == _draws()  # the states of the moment of the save
    names = ["hf/config.json", "mp_rank_00_model_states.pt", "rng_rank_00000.pt"]
    names.append("zero_pp_rank_0_mp_rank_00_optim_states.pt")
    files = {
        n: {"bytes": (tag_dir / n).stat().st_size, "sha256": hashlib.sha256((tag_dir / n).read_bytes()).hexdigest()}
        for n in names
    }
    expected = {"step": 10, "tag": "step_00000010", "world_size": 2, "files": files, "config": CLIENT["config"]}
    text = json.dumps(expected, indent=1)
    assert (tag_dir / MANIFEST).read_text() == text
    assert sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file()) == sorted([*names, MANIFEST])
    assert mgr.run.latest_file.read_text() == "step_00000010"
    assert writes == [
        (tag_dir / MANIFEST, text, "checkpoint manifest"),
        (mgr.run.latest_file, "step_00000010", "checkpoint pointer"),
    ]
    assert ck.verify(tag_dir) == expected


def test_save_rank_1_writes_only_its_own_files(tmp_path):
    ok = Ok()
    mgr = manager(tmp_path, rank=1, world_size=2, all_ok=ok)
    stale = mgr.root / "step_00000010" / "stale.bin"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"rank 0 cleans")
    extra: list[Path] = []
    engine = FakeEngine()
    assert mgr.save(engine, 10, CLIENT, extra.append) == mgr.root / "step_00000010"
    assert engine.calls == [(str(mgr.root), "step_00000010", CLIENT, False)]
    assert extra == [] and ok.calls == [True, True, True] and mgr.last_saved == 10
    assert sorted(p.name for p in stale.parent.iterdir()) == [
        "mp_rank_00_model_states.pt",
        "rng_rank_00001.pt",
        "stale.bin",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]
    assert not mgr.run.latest_file.exists()


def test_save_prunes_old_and_incomplete_tags(tmp_path, big_disk):
    mgr = manager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        write_tag(mgr.root, step, {"a": b"x"})
    write_tag(mgr.root, 4, {"a": b"x"}, manifest=False)
    (mgr.root / "other").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (mgr.root / "step_00000006").symlink_to(outside)  # rmtree refuses a link: ignored, kept
    mgr.save(FakeEngine(), 5, {})
    names = sorted(p.name for p in mgr.root.iterdir())
    assert names == ["latest", "other", "step_00000003", "step_00000005", "step_00000006"]


def test_save_keeps_the_tag_it_wrote_when_newer_ones_exist(tmp_path, big_disk):
    mgr = manager(tmp_path, keep_last=1)
    write_tag(mgr.root, 20, {"a": b"x"})
    write_tag(mgr.root, 15, {"a": b"x"})
    mgr.save(FakeEngine(), 10, {})
    assert sorted(p.name for p in mgr.root.iterdir()) == ["latest", "step_00000010", "step_00000020"]
    assert mgr.run.latest_file.read_text() == "step_00000010"


def _spy_message(monkeypatch):
    calls: list[tuple] = []

    def message(what, where, error, *, needed=None, intact):
        calls.append((what, Path(where), error, needed, intact))
        return "MESSAGE"

    monkeypatch.setattr(ck, "disk_full_message", message)
    return calls


def test_save_full_disk_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch, big_disk):
    ok = Ok()
    mgr = manager(tmp_path, all_ok=ok)
    write_tag(mgr.root, 5, {"a": b"12345"})
    full = OSError(errno.ENOSPC, "No space left on device")
    full.__cause__ = ValueError("underneath")
    calls = _spy_message(monkeypatch)
    with pytest.raises(CheckpointError, match=r"^MESSAGE$"):
        mgr.save(FakeEngine(fail=full), 10, {})
    intact = f"the last complete checkpoint {mgr.root / 'step_00000005'} is intact and a rerun resumes from it"
    assert calls == [("checkpoint", mgr.root / "step_00000010", full, sizes(mgr.root / "step_00000005"), intact)]
    assert ok.calls == [True, False]
    assert [t for _, t in ck.list_tags(mgr.root)] == ["step_00000005"]
    assert mgr.last_saved is None


def test_save_reports_the_cause_of_a_disk_full_error(tmp_path, monkeypatch, big_disk):
    mgr = manager(tmp_path)
    cause = OSError(errno.ENOSPC, "No space left on device")
    wrapped = DiskFullError("wrapped")
    wrapped.__cause__ = cause
    calls = _spy_message(monkeypatch)
    with pytest.raises(CheckpointError):
        mgr.save(FakeEngine(fail=wrapped), 10, {})
    bare = DiskFullError("bare")
    with pytest.raises(CheckpointError):
        mgr.save(FakeEngine(fail=bare), 10, {})
    assert [c[2] for c in calls] == [cause, bare]
    assert [c[4] for c in calls] == ["there is no complete checkpoint yet"] * 2


def test_save_other_errors_pass_unchanged(tmp_path, big_disk):
    ok = Ok()
    mgr = manager(tmp_path, all_ok=ok)
    with pytest.raises(ValueError, match=r"^bad$"):
        mgr.save(FakeEngine(fail=ValueError("bad")), 10, {})
    assert ok.calls == [True]


def test_save_fails_on_every_rank_when_another_rank_could_not_write(tmp_path, monkeypatch):
    ok = Ok(answers=[True, False])
    mgr = manager(tmp_path, rank=1, world_size=2, all_ok=ok)
    calls = _spy_message(monkeypatch)
    with pytest.raises(CheckpointError, match=r"^MESSAGE$"):
        mgr.save(FakeEngine(), 10, {})
    tag_dir = mgr.root / "step_00000010"
    assert ok.calls == [True, True]
    assert calls == [("checkpoint", tag_dir, None, sizes(tag_dir), "there is no complete checkpoint yet")]
    assert sizes(tag_dir) > 0  # rank 1 leaves the folder to rank 0


def test_save_failed_names_the_newest_other_complete_tag(tmp_path, monkeypatch):
    mgr = manager(tmp_path)
    write_tag(mgr.root, 5, {"a": b"1"})
    write_tag(mgr.root, 10, {"a": b"12345678"})
    write_tag(mgr.root, 12, {"a": b"1"}, manifest=False)
    failed = write_tag(mgr.root, 15, {"a": b"1"})  # a stale manifest in the folder being written
    calls = _spy_message(monkeypatch)
    err = OSError(errno.ENOSPC, "full")
    assert str(mgr._save_failed(failed, err)) == "MESSAGE"
    intact = f"the last complete checkpoint {mgr.root / 'step_00000010'} is intact and a rerun resumes from it"
    assert calls == [("checkpoint", failed, err, sizes(mgr.root / "step_00000010"), intact)]
    assert not failed.exists()
    assert str(mgr._save_failed(mgr.root / "step_00000099", None)) == "MESSAGE"  # nothing written yet: no error


# -- exports ---------------------------------------------------------------------------------------------------


def test_export_final(tmp_path, monkeypatch):
    mgr = manager(tmp_path)
    calls: list[tuple] = []
    monkeypatch.setattr("pretrain.export.export_checkpoint", lambda *a: calls.append(a))
    with pytest.raises(FileNotFoundError, match="no checkpoint to export"):
        mgr.export_final()
    mgr.root.mkdir()
    mgr.run.latest_file.write_text("step_00000010")
    assert mgr.export_final() == (mgr.run.student, True)
    assert calls == [(mgr.root, mgr.run.student, "step_00000010")]
    mgr.run.student.mkdir()
    (mgr.run.student / "distill_export.json").write_text(json.dumps({"checkpoint": str(mgr.root / "step_00000010")}))
    assert mgr.export_final() == (mgr.run.student, False)
    assert len(calls) == 1

    def refuse(*a):
        raise OutputExistsError("student/ is not an export")

    monkeypatch.setattr("pretrain.export.export_checkpoint", refuse)
    mgr.run.latest_file.write_text("step_00000020")
    with pytest.raises(CheckpointError, match=r"^student/ is not an export$"):
        mgr.export_final()


def test_export_init(tmp_path, monkeypatch):
    mgr = manager(tmp_path)
    space: list[tuple] = []
    monkeypatch.setattr(mgr, "preflight_space", lambda c, e: space.append((c, e)))
    saved: list[tuple] = []

    def save_student(student, out, meta, info):
        saved.append((student, out, meta.parent, (meta / "meta.txt").read_text(), info))

    monkeypatch.setattr("pretrain.export.save_student", save_student)

    def write_meta(folder: Path) -> None:
        (folder / "meta.txt").write_text("meta")

    student, info = Student(), {"k": 1}
    assert mgr.export_init(student, write_meta, info) == mgr.run.student_init
    assert saved == [(student, mgr.run.student_init, mgr.run.root, "meta", info)]
    assert space == [(6 * 12 + 40, 64)]
    mgr.run.student_init.mkdir()
    assert mgr.export_init(student, lambda m: None, info) is None
    assert len(saved) == 1

    def full(*a):
        raise DiskFullError("could not write student_init")

    monkeypatch.setattr("pretrain.export.save_student", full)
    shutil.rmtree(mgr.run.student_init)
    with pytest.raises(CheckpointError, match=r"^could not write student_init$"):
        mgr.export_init(student, lambda m: None, info)
