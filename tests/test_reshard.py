"""pretrain.reshard: a ZeRO checkpoint resumed with another number of ranks keeps the Adam moments.

Real DeepSpeed engines (CPU accelerator, gloo) on a small MLP with torch AdamW; every rank is a subprocess running
this file (``python tests/test_reshard.py SPEC``), as srun or the DeepSpeed launcher would start it. Global batch 4
at every world size (2 ranks x micro 2, or 1 rank x micro 2 x accumulation 2) with the same samples per step, so a run
whose state is resharded follows the straight run's losses.

The legs: 2 ranks train steps 1-3 and save (with rng files, hf/ and checkpoint.json beside DeepSpeed's, as the trainer);
1 rank converts, loads and trains 4-6 and saves; 2 ranks convert, load and train 7-8. At each load the full fp32
weights, exp_avg, exp_avg_sq and the Adam step (gathered with deepspeed.utils.safe_get_full_*) equal the saving run's
exactly, the weights equal zero_to_fp32's consolidation of the source, and the losses after the load equal a straight
2-rank run's. Today's fallback (load_optimizer_states=False) is run too: its losses leave the straight run's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import record_effect

REPO = Path(__file__).resolve().parent.parent
# Error budget of the logged losses (fp32 on CPU, a loss of order 1, so ~6e-8 rounding per operation):
# - SAME_LAYOUT_TOL: a run cut at a checkpoint vs the straight run with the same ranks does the same arithmetic
#   (measured difference 0); 1e-6 leaves room for a platform's kernel choice, nothing for a changed state.
# - RESHARDED_TOL: 2 ranks -> 1 (or back) reduces the same gradients in another grouping; rounding of relative
#   6e-8, amplified through Adam's division by sqrt(exp_avg_sq) (~1e-5 here) over <= 3 steps, stays below 1e-5
#   (measured 0 on CPU).
# - RESTART_GAP = 10 x RESHARDED_TOL: restarting the moments (the fallback) must move the loss by more than 10 x the
#   band a resumed run may drift in, so that no loss passes as both (measured 1.1e-2; the resumed run 0).
SAME_LAYOUT_TOL, RESHARDED_TOL = 1e-6, 1e-5
RESTART_GAP = 10 * RESHARDED_TOL
GLOBAL_BATCH, MICRO, LR = 4, 2, 1e-2
SIZES = (16, 32, 32, 7)  # 16*32+32 + 32*32+32 + 32*7+7 = 1831 parameters: odd, so partitions are padded and the
#                          2-rank boundary falls inside the second weight matrix


# -- the rank process ----------------------------------------------------------------------------------------------


def _model(seed: int):
    """A frozen LayerNorm (like the student's frozen pooler), three Linear layers, a buffer; all drawn from ``seed``."""
    import torch

    torch.manual_seed(seed)
    norm = torch.nn.LayerNorm(SIZES[0])
    layers: list[torch.nn.Module] = [norm]
    for a, b in itertools.pairwise(SIZES):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers[:-1])
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_(0.0, 0.1)
    model[0].requires_grad_(False)
    model.register_buffer("offset", torch.randn(SIZES[0]) * 0.1)  # used in forward: x + offset
    return model


def _ds_config(stage: int, dtype: str, fused: bool, world_size: int) -> dict:
    return {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GLOBAL_BATCH // (MICRO * world_size),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": LR,
                "betas": [0.9, 0.98],
                "eps": 1e-6,
                "weight_decay": 0.01,
                "torch_adam": True,
                "fused": fused,
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"total_num_steps": 20, "warmup_num_steps": 2, "warmup_max_lr": LR, "warmup_min_lr": 0.0},
        },
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": dtype == "bf16"},
        "steps_per_print": 2**31 - 1,
    }


def _batch(step: int, rank: int, world_size: int, micro: int):
    """Micro-batch ``micro`` of ``rank`` at ``step``: rows of the step's global batch, the same at every world size."""
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(GLOBAL_BATCH, SIZES[0], generator=g), torch.randn(GLOBAL_BATCH, SIZES[-1], generator=g)
    i = (rank * (GLOBAL_BATCH // (MICRO * world_size)) + micro) * MICRO
    return x[i : i + MICRO], y[i : i + MICRO]


def _full_state(engine) -> dict:
    """Every parameter's full fp32 weight, exp_avg, exp_avg_sq (collective) and the optimizer's step count(s)."""
    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out, frozen = {}, {}
    started = bool(engine.optimizer.optimizer.state)  # empty after a load without optimizer states, before a step
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        fp32 = safe_get_full_fp32_param(p).detach().float().clone()
        out[name] = {
            "fp32": fp32,
            **{
                key: safe_get_full_optimizer_state(p, key).detach().float().clone()
                if started
                else torch.zeros_like(fp32)
                for key in ("exp_avg", "exp_avg_sq")
            },
        }
    fixed = [p for p in engine.module.parameters() if not p.requires_grad]
    with deepspeed.zero.GatheredParameters(fixed, enabled=any(hasattr(p, "ds_id") for p in fixed)):  # ZeRO-3
        for name, t in [*engine.module.named_parameters(), *engine.module.named_buffers()]:
            if not t.requires_grad:
                frozen[name] = t.detach().float().clone()
    steps = sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s})
    return {
        "params": out,
        "frozen": frozen,
        "adam_steps": steps,
        "global_steps": engine.global_steps,
        "lr": engine.get_lr()[0],
    }


def worker(spec: dict) -> None:
    """One rank: build the engine, optionally load (``spec["load"]``), train, save, dump states and losses."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from pretrain import reshard

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, ws = dist.get_rank(), dist.get_world_size()
    stage, dtype, fused = spec["stage"], spec["dtype"], spec["fused"]
    config = _ds_config(stage, dtype, fused, ws)
    load = spec.get("load")
    universal = load is not None and load["how"] == "universal"
    if universal:
        config = reshard.with_universal_load(config)
    model = _model(spec.get("seed", 0))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config
    )
    report: dict[str, Any] = {"world_size": ws, "losses": {}}
    step = 0
    if load:
        root, tag = Path(load["root"]), load["tag"]
        if universal:
            timing = time.perf_counter()
            if rank == 0:
                reshard.to_universal(root, tag)
            dist.barrier()
            report["convert_s"] = time.perf_counter() - timing
            uroot = reshard.universal_dir(root, tag).parent
            path, client = engine.load_checkpoint(str(uroot), tag=tag)
            report["restored"] = reshard.restore_frozen(engine, uroot, tag)
        else:  # today's fallback: weights and schedule, the moments restart
            path, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=False)
        assert path is not None, "load_checkpoint failed"
        step = int(client["step"])
        report["client"] = {k: client[k] for k in ("step", "data") if k in client}
        report["loaded"] = _full_state(engine)
    gas = engine.gradient_accumulation_steps()
    for _ in range(spec["steps"]):
        step += 1
        total = torch.zeros(())
        for m in range(gas):
            x, y = _batch(step, rank, ws, m)
            x = x + engine.module.offset.float()
            loss = torch.nn.functional.mse_loss(engine(x.to(torch.bfloat16) if dtype == "bf16" else x).float(), y)
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        dist.all_reduce(total)
        report["losses"][step] = float(total) / (gas * ws)
    if spec.get("save"):  # the trainer's layout: DeepSpeed's files, then ours beside them (rng, hf/, checkpoint.json)
        root, tag = Path(spec["save"]), f"step_{step:08d}"
        engine.save_checkpoint(
            str(root),
            tag=tag,
            client_state={"step": step, "data": {"batch": step, "world_size": ws}},
            save_latest=False,
        )
        torch.save({"torch": torch.get_rng_state()}, root / tag / f"rng_rank_{rank:05d}.pt")
        dist.barrier()
        if rank == 0:
            (root / tag / "hf").mkdir()
            (root / tag / "hf" / "config.json").write_text("{}")
            files = sorted(str(p.relative_to(root / tag)) for p in (root / tag).rglob("*") if p.is_file())
            (root / tag / "checkpoint.json").write_text(json.dumps({"step": step, "world_size": ws, "files": files}))
            (root / "latest").write_text(tag)
    report["final"] = _full_state(engine)
    if rank == 0:
        torch.save(report, spec["report"])
    dist.barrier()


# -- the tests -----------------------------------------------------------------------------------------------------


def launch(tmp: Path, name: str, ranks: int, **spec) -> dict:
    """Run ``ranks`` rank processes of :func:`worker`; returns rank 0's report (with ``wall_s``)."""
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {"report": str(tmp / f"{name}.pt"), **spec}
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(ranks),
        LOCAL_WORLD_SIZE=str(ranks),
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    logs = [tmp / f"{name}.rank{r}.log" for r in range(ranks)]
    start = time.perf_counter()
    with contextlib.ExitStack() as files:
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, json.dumps(spec)],
                cwd=REPO,
                stdout=files.enter_context(open(log, "w")),  # the rank's own log, closed when the ranks are done
                stderr=subprocess.STDOUT,
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            )
            for r, log in enumerate(logs)
        ]
        try:
            codes = [p.wait(timeout=300) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    assert codes == [0] * ranks, f"{name}: exit codes {codes}\n" + "\n".join(log.read_text()[-5000:] for log in logs)
    report = torch.load(spec["report"], weights_only=False)
    report["wall_s"] = time.perf_counter() - start
    return report


def assert_same_state(got: dict, want: dict, tol: float = 1e-6) -> None:
    """Weights and both moments equal ``want``'s within ``tol`` relative to each tensor's largest value (exp_avg_sq is
    ~1e-5 here), every moment mostly nonzero (a restart gives zeros); the frozen parameters and the buffer equal; the
    same Adam step, global step and LR."""
    import torch

    assert got["params"].keys() == want["params"].keys()
    share = max(
        (got["params"][n][k] - ref).abs().max().item() / (tol * ref.abs().max().item())
        for n, states in want["params"].items()
        for k, ref in states.items()
    )
    record_effect("weights and moments: max difference / (tol x largest value)", share, 1.0, "tolerance share <=")
    for name, states in want["params"].items():
        for key, ref in states.items():
            value, scale = got["params"][name][key], ref.abs().max().item()
            assert value.shape == ref.shape, (name, key)
            assert scale > 0 and (ref != 0).float().mean() > 0.9, f"{name} {key} is zero in the reference"
            err = (value - ref).abs().max().item()
            assert err <= tol * scale, f"{name} {key}: max difference {err}, largest value {scale}"
    assert got["frozen"].keys() == want["frozen"].keys() == {"0.weight", "0.bias", "offset"}
    for name, ref in want["frozen"].items():
        assert torch.equal(got["frozen"][name], ref), name
    assert got["adam_steps"] == want["adam_steps"] and len(want["adam_steps"]) == 1 and want["adam_steps"][0] > 0
    assert got["global_steps"] == want["global_steps"]
    assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)


def assert_losses(got: dict, want: dict, steps, tol: float) -> None:
    record_effect(
        f"losses: max difference / {tol:g}", max(abs(got[s] - want[s]) / tol for s in steps), 1.0, "tolerance share <="
    )
    for s in steps:
        assert abs(got[s] - want[s]) <= tol, f"step {s}: {got[s]} vs {want[s]} (tol {tol})"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_to_one_to_two_keep_weights_and_adam_moments(stage, tmp_path):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pretrain import reshard
    from pretrain.checkpoint import list_tags

    base = {"stage": stage, "dtype": "fp32", "fused": True}
    a_root, b_root = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints"
    straight = launch(tmp_path, "straight", 2, steps=8, **base)
    a = launch(tmp_path, "a", 2, steps=3, save=str(a_root), **base)
    assert_losses(a["losses"], straight["losses"], range(1, 4), tol=SAME_LAYOUT_TOL)

    # 2 ranks -> 1 rank
    b = launch(
        tmp_path,
        "b",
        1,
        steps=3,
        save=str(b_root),
        **base,
        seed=1,
        load={"how": "universal", "root": str(a_root), "tag": "step_00000003"},
    )
    assert_same_state(b["loaded"], a["final"])  # b's model was built from another seed: every value was loaded
    assert b["restored"] == ["0.bias", "0.weight", "offset"]
    assert b["client"] == {"step": 3, "data": {"batch": 3, "world_size": 2}}  # the trainer's client state survives
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(a_root), tag="step_00000003")
    for name, states in b["loaded"]["params"].items():
        assert torch.equal(states["fp32"], consolidated[name].float()), name
    fresh = dict([*_model(1).named_parameters(), *_model(1).named_buffers()])
    assert all(not torch.equal(fresh[n], t) for n, t in a["final"]["frozen"].items())  # seeds 0 and 1 differ
    for name, states in a["final"]["params"].items():  # the converter's per-parameter files are the gathered state
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            saved = torch.load(a_root / "universal" / "step_00000003" / "zero" / name / f"{key}.pt", weights_only=False)
            saved = saved["param"] if isinstance(saved, dict) else saved  # ZeRO-3: a bare flat tensor
            assert torch.equal(saved.float().view_as(states[key]), states[key]), (name, key)
    assert_losses(b["losses"], straight["losses"], range(4, 7), tol=RESHARDED_TOL)
    assert list_tags(a_root) == [(3, "step_00000003")]  # the conversion is not a tag
    assert reshard.is_converted(a_root, "step_00000003")

    restart = None
    if stage < 3:  # today's fallback (ZeRO-3 was refused) restarts the moments: the losses leave the straight run's
        restart = launch(
            tmp_path,
            "restart",
            1,
            steps=3,
            **base,
            seed=1,
            load={"how": "restart", "root": str(a_root), "tag": "step_00000003"},
        )
        assert all(s["exp_avg"].abs().max() == 0 for s in restart["loaded"]["params"].values())
        gap, kept = (abs(r["losses"][6] - straight["losses"][6]) for r in (restart, b))
        record_effect("restart's loss gap / 1e-4", gap / RESTART_GAP, 1.0, ">")  # RESTART_GAP
        record_effect("restart's loss gap / resumed run's", gap / max(kept, 1e-30), 100.0, ">")
        assert gap > RESTART_GAP and gap > 100 * kept and kept <= RESHARDED_TOL, (gap, kept)

    # 1 rank -> 2 ranks
    c = launch(
        tmp_path,
        "c",
        2,
        steps=2,
        **base,
        seed=1,
        load={"how": "universal", "root": str(b_root), "tag": "step_00000006"},
    )
    assert_same_state(c["loaded"], b["final"])
    assert c["client"]["step"] == 6
    assert_losses(c["losses"], straight["losses"], range(7, 9), tol=RESHARDED_TOL)
    print(
        f"\nZeRO-{stage}: wall s straight {straight['wall_s']:.1f}, 2 ranks {a['wall_s']:.1f}, "
        f"2->1 {b['wall_s']:.1f} (convert {b['convert_s']:.2f}), 1->2 {c['wall_s']:.1f} "
        f"(convert {c['convert_s']:.2f})" + (f", restart {restart['wall_s']:.1f}" if restart else "")
    )


def test_conversion_is_atomic_reused_and_replaced(tmp_path):
    """One conversion at a time under checkpoints/universal: complete ones reused, stale or cut-off ones replaced,
    only DeepSpeed's files read; discard() removes it. (One ZeRO-2 rank saves; about 10 s.)"""
    from pretrain import reshard
    from pretrain.checkpoint import list_tags

    root = tmp_path / "checkpoints"
    launch(tmp_path, "one", 1, steps=1, save=str(root), stage=2, dtype="fp32", fused=True)
    (root / "universal" / ".step_00000001.cutoff").mkdir(parents=True)  # a conversion cut off half-way
    (root / "universal" / "step_00000000").mkdir()  # the conversion of an older tag
    assert not reshard.is_converted(root, "step_00000001")
    assert reshard.to_universal(root, "step_00000001") == (root / "universal", "step_00000001")
    out = root / "universal" / "step_00000001"
    assert sorted(p.name for p in (root / "universal").iterdir()) == ["step_00000001"]
    assert {p.name for p in out.iterdir()} == {"zero", "mp_rank_00_model_states.pt", reshard.MARKER}
    assert (out / "zero" / "1.weight" / "exp_avg.pt").is_file() and not (out / "hf").exists()
    assert reshard.is_converted(root, "step_00000001") and list_tags(root) == [(1, "step_00000001")]
    stamp = (out / reshard.MARKER).stat().st_mtime_ns
    reshard.to_universal(root, "step_00000001")
    assert (out / reshard.MARKER).stat().st_mtime_ns == stamp  # reused
    model_states = root / "step_00000001" / "mp_rank_00_model_states.pt"
    os.utime(model_states, ns=(stamp, stamp + 10**9))  # the tag saved again (a cut-off save redone)
    assert not reshard.is_converted(root, "step_00000001")
    reshard.to_universal(root, "step_00000001")
    assert reshard.is_converted(root, "step_00000001") and (out / reshard.MARKER).stat().st_mtime_ns != stamp
    reshard.discard(root)
    assert not (root / "universal").exists() and list_tags(root) == [(1, "step_00000001")]


def test_config_patch_and_which_resumes_need_a_conversion():
    from pretrain import reshard

    ds = {"zero_optimization": {"stage": 2}, "checkpoint": {"tag_validation": "Warn"}}
    patched = reshard.with_universal_load(ds)
    assert patched["checkpoint"] == {"tag_validation": "Warn", "load_universal": True}
    assert ds["checkpoint"] == {"tag_validation": "Warn"}  # the argument is not changed
    assert reshard.with_universal_load({})["checkpoint"] == {"load_universal": True}
    assert [reshard.needs_universal(s, 2, 1) for s in (0, 1, 2, 3)] == [False, True, True, True]
    assert not reshard.needs_universal(2, 4, 4)


def test_a_tag_without_zero_partitions_is_refused(tmp_path):
    from pretrain import reshard

    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000001" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a ZeRO-1/2/3 checkpoint"):
        reshard.to_universal(tmp_path, "step_00000001")
    with pytest.raises(FileNotFoundError):
        reshard.to_universal(tmp_path, "step_00000002")


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
