"""Resume a ZeRO checkpoint with another number of ranks, optimizer state included: DeepSpeed's universal checkpoint.

A ZeRO-1/2/3 checkpoint holds one flat partition of the fp32 weights and of Adam's ``exp_avg`` / ``exp_avg_sq`` per
rank, cut at offsets that depend on the world size, so DeepSpeed cannot load it with another world size
(``ZeRORuntimeException: ... Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
currently supported``). Its *universal checkpoint* is the same state cut per parameter instead: DeepSpeed's converter
(``deepspeed.checkpoint.ds_to_universal``) writes, for every parameter, ``zero/<name>/fp32.pt``, ``exp_avg.pt``,
``exp_avg_sq.pt`` and ``step.pt`` (whole tensors), and an engine created with ``"checkpoint": {"load_universal": true}``
in its config loads that with any world size, each rank taking its own partition.

Layout (beside the tags, never matched by :data:`pretrain.checkpoint.TAG_RE`, so never resumed from nor pruned as
a tag)::

    checkpoints/universal/step_00001000/     the conversion of checkpoints/step_00001000
        zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt, zero/optimizer_state.pt
        mp_rank_00_model_states.pt            copied (ZeRO-3: zero_pp_rank_*_mp_rank_00_model_states.pt): client
                                              state (step, data cursor, counters), LR schedule, frozen parameters
        universal.json                        written before the folder is renamed into place: the source it matches
    checkpoints/universal/.step_00001000.XXXX/   a conversion in progress (or cut off: removed by the next one)

Use (rank 0 converts, every rank loads)::

    ds_config = with_universal_load(ds_config)            # before deepspeed.initialize
    if rank == 0:
        root, tag = to_universal(checkpoints_root, tag)   # root = checkpoints_root / "universal"
    barrier()
    load_path, client = engine.load_checkpoint(str(checkpoints_root / UNIVERSAL), tag=tag)
    restore_frozen(engine, checkpoints_root / UNIVERSAL, tag)
    barrier()
    if rank == 0:
        discard(checkpoints_root)

``engine.load_checkpoint`` returns the client state of the copied ``mp_rank_00_model_states.pt`` (the trainer's step,
data cursor and counters) and restores the LR scheduler and ``global_steps`` from it; it restores only the
parameters the optimizer holds, hence :func:`restore_frozen` for frozen parameters and buffers.

Supported here (DeepSpeed 0.19.8, CPU accelerator, gloo; tests/test_reshard.py): see docs/cluster.md, "Changing the
number of ranks".
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

UNIVERSAL = "universal"  # checkpoints/universal/<tag>
MARKER = "universal.json"
STAGES = (1, 2, 3)  # ZeRO stages whose optimizer partitions depend on the world size


def needs_universal(stage: int, saved_world_size: int, world_size: int) -> bool:
    """Whether resuming a ZeRO-``stage`` checkpoint of ``saved_world_size`` ranks on ``world_size`` ranks must go
    through a universal checkpoint (ZeRO-0 keeps the whole optimizer state in the model-states file and loads as is)."""
    return int(stage) in STAGES and int(saved_world_size) != int(world_size)


def with_universal_load(ds_config: dict) -> dict:
    """A copy of the DeepSpeed config dict with ``checkpoint.load_universal`` on (give it to ``deepspeed.initialize``;
    the engine then loads every checkpoint, from ``load_checkpoint``, as a universal one)."""
    out = copy.deepcopy(ds_config)
    section = out.get("checkpoint")
    out["checkpoint"] = {**(section if isinstance(section, dict) else {}), "load_universal": True}
    return out


def universal_dir(checkpoints_root: Path, tag: str) -> Path:
    """Where the conversion of ``checkpoints_root/tag`` goes: ``checkpoints_root/universal/tag``."""
    return Path(checkpoints_root) / UNIVERSAL / tag


def _deepspeed_files(tag_dir: Path) -> list[Path]:
    """The files DeepSpeed wrote in a tag (model states and optimizer partitions), not ours (rng, hf/, manifest)."""
    return sorted(
        p
        for p in tag_dir.iterdir()
        if p.is_file() and (p.name.endswith("_model_states.pt") or p.name.endswith("_optim_states.pt"))
    )


def _source(tag_dir: Path) -> dict:
    """What a conversion was made from: the tag and each DeepSpeed file's size and modification time (a re-save of
    the same step, after a cut-off save, gives new ones), and the DeepSpeed version that converted it."""
    import deepspeed

    return {
        "tag": tag_dir.name,
        "deepspeed": deepspeed.__version__,
        "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in _deepspeed_files(tag_dir)},
    }


def is_converted(checkpoints_root: Path, tag: str) -> bool:
    """Whether ``checkpoints_root/universal/tag`` is a complete conversion of the current ``checkpoints_root/tag``."""
    marker = universal_dir(checkpoints_root, tag) / MARKER
    try:
        return json.loads(marker.read_text()) == _source(Path(checkpoints_root) / tag)
    except (OSError, ValueError):
        return False


def _convert(src: Path, files: list[Path], dest: Path, workers: int) -> None:
    """Run DeepSpeed's ``ds_to_universal`` on links to ``files`` (the DeepSpeed files of the tag folder ``src``) in a
    temporary folder beside ``dest``; rename its output, with :data:`MARKER` naming the source, over ``dest``.
    Raises ``RuntimeError`` with DeepSpeed's output when the converter fails; the temporary folder is removed."""
    from deepspeed.checkpoint import ds_to_universal

    tag, parent = dest.name, dest.parent
    source = _source(src)
    work = Path(tempfile.mkdtemp(dir=parent, prefix=f".{tag}."))
    try:
        staged, out = work / "in" / tag, work / "out" / tag
        staged.mkdir(parents=True)
        for f in files:
            (staged / f.name).symlink_to(f.resolve())
        args = argparse.Namespace(
            input_folder=str(staged),
            output_folder=str(out),
            num_extract_workers=workers,
            num_merge_workers=workers,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )  # our engines record no universal_checkpoint_info
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
        except Exception as e:
            raise RuntimeError(
                f"converting {src} to a universal checkpoint failed: {type(e).__name__}: {e}\n{log.getvalue()[-4000:]}"
            ) from e
        (out / MARKER).write_text(json.dumps(source, indent=1))
        if dest.exists():  # a stale conversion of an earlier save of this tag
            shutil.rmtree(dest)
        os.replace(out, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def to_universal(checkpoints_root: Path, tag: str, *, workers: int = 1) -> tuple[Path, str]:
    """Convert the ZeRO checkpoint ``checkpoints_root/tag`` into a universal checkpoint; returns ``(root, tag)`` for
    ``engine.load_checkpoint(str(root), tag=tag)`` by an engine configured with :func:`with_universal_load`.

    Run it on one rank (rank 0), then a barrier. DeepSpeed's converter runs in this process on a folder of links to
    the tag's DeepSpeed files only (our ``rng_rank_*.pt``, ``hf/`` and ``checkpoint.json`` are left out); its output is
    renamed into ``checkpoints_root/universal/tag`` once complete, so a conversion cut off half-way is never loaded.
    A complete conversion of the same files is reused (a run cut off between the conversion and the load); the
    conversions of other tags and cut-off ones are deleted; :func:`discard` deletes the folder once every rank has
    loaded. ``workers`` > 1 extracts and merges in that many processes (DeepSpeed's ``ProcessPoolExecutor``); 1, the
    default, forks nothing.

    Disk: the conversion holds each parameter's fp32 weight and both Adam moments (12 bytes per trained parameter)
    plus a copy of ``mp_rank_00_model_states.pt``; while it runs, DeepSpeed's temporary fragments take about as much
    again.

    Raises ``FileNotFoundError`` when the tag has no ZeRO optimizer partitions (``*_optim_states.pt``: ZeRO-0 needs
    no conversion), ``RuntimeError`` naming the tag and DeepSpeed's output when the converter fails.
    """
    root = Path(checkpoints_root)
    src, dest = root / tag, universal_dir(root, tag)
    files = _deepspeed_files(src) if src.is_dir() else []
    if not any(p.name.endswith("_optim_states.pt") for p in files):
        raise FileNotFoundError(
            f"{src} holds no ZeRO optimizer partitions (*_optim_states.pt): not a ZeRO-1/2/3 "
            f"checkpoint, nothing to convert"
        )
    parent = dest.parent
    parent.mkdir(exist_ok=True)
    if not is_converted(root, tag):
        _convert(src, files, dest, workers)
    for other in parent.iterdir():  # older conversions, cut-off ones
        if other.name != tag:
            shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
    return parent, tag


def discard(checkpoints_root: Path) -> None:
    """Delete ``checkpoints_root/universal`` (call on rank 0 once every rank has loaded: a later conversion, if one is
    needed, starts over)."""
    shutil.rmtree(Path(checkpoints_root) / UNIVERSAL, ignore_errors=True)


def _frozen_and_buffers(folder: Path) -> dict:
    """The full values of the frozen parameters and the buffers saved in a checkpoint folder's model-states files:
    whole tensors in ``mp_rank_00_model_states.pt`` (ZeRO-0/1/2), or under ZeRO-3 the buffers of
    ``zero_pp_rank_0_...`` and each frozen parameter's per-rank fragments, concatenated in rank order."""
    import torch

    files = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=lambda p: int(p.name.split("_")[3]))
    if not files:
        state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return dict(state["module"])
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    out = {k: v for k, v in states[0]["module"].items() if v.numel()}  # buffers (parameters are empty placeholders)
    for name, shape in (states[0].get("frozen_param_shapes") or {}).items():
        flat = torch.cat([s["frozen_param_fragments"][name] for s in states])
        out[name] = flat[: torch.Size(shape).numel()].view(shape)
    return out


def restore_frozen(engine, root: Path, tag: str) -> list[str]:
    """After a universal ``engine.load_checkpoint(root, tag)``: copy the checkpoint's frozen parameters and buffers
    into ``engine.module``; returns their names. Collective under ZeRO-3 (call it on every rank).

    DeepSpeed 0.19.8's universal load restores only the parameters its optimizer holds (from ``zero/``): it skips the
    module state, so parameters with ``requires_grad=False`` (this project's student pooler) and buffers would keep
    the values the model was built with.
    """
    import deepspeed
    import torch

    module = engine.module
    saved = _frozen_and_buffers(Path(root) / tag)
    frozen = {n: p for n, p in module.named_parameters() if not p.requires_grad and n in saved}
    buffers = {n: b for n, b in module.named_buffers() if n in saved}
    stage3 = any(hasattr(p, "ds_id") for p in frozen.values())
    gather = (
        deepspeed.zero.GatheredParameters(list(frozen.values()), modifier_rank=0)
        if stage3
        else contextlib.nullcontext()
    )
    with torch.no_grad(), gather:
        for name, tensor in {**frozen, **buffers}.items():
            tensor.copy_(saved[name].to(device=tensor.device, dtype=tensor.dtype).view_as(tensor))
    return sorted(frozen) + sorted(buffers)
