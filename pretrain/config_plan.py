"""What ``python -m pretrain.config CONFIG`` checks beyond the schema, without training, and the plan it prints.

:func:`pretrain.config.load` validates each section and the cross-section rules and reads no model or data. The
command line also reads what is on disk (or in the local Hugging Face cache) when it can:

- the teacher's config: the student's layer indices against the teacher's depth (an error, exit 2);
- the prepared shards: a missing ``data.dir`` or manifest is a warning (a run on another machine may have them);
- the derived plan for a world size: micro-batch, accumulation, sequences per step, steps, sequences and tokens in
  all (tokens at most ``sequences x max_seq_length`` from the shards' manifest, packed sequences being nearly full).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_prep.errors import DataPrepError
from pretrain import ds_config
from pretrain.config import RunConfig

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


def teacher_config(cfg: RunConfig) -> PreTrainedConfig | None:
    """The teacher's config, read without a download (local folder, the embedded assets, or the Hugging Face cache);
    None when it cannot be read here."""
    from transformers import AutoConfig

    from data_prep.embedded import resolve_model

    try:
        path = resolve_model(cfg.teacher.name_or_path)
        return AutoConfig.from_pretrained(path, revision=cfg.teacher.revision, local_files_only=True)
    except (OSError, ValueError, DataPrepError):
        return None


def teacher_layers(cfg: RunConfig) -> int | None:
    """The teacher's ``num_hidden_layers`` from its config (:func:`teacher_config`); None when it cannot be read."""
    n = getattr(teacher_config(cfg), "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None


def check_layers(cfg: RunConfig, tconf: PreTrainedConfig) -> list[int]:
    """The student's layer map for the teacher of config ``tconf``, as the run resolves it
    (:func:`pretrain.student.teacher_layer_map`: with the family's layer kinds, so "cadence" on ModernBERT).

    Raises:
        ConfigError: ``student.layers`` out of range, repeated or decreasing (names the teacher's depth); a refused
        teacher family (ALBERT).
    """
    from pretrain.student import teacher_layer_map

    return teacher_layer_map(cfg.student.layers, tconf)


def read_manifest(cfg: RunConfig) -> tuple[dict[str, Any] | None, str | None]:
    """The shards' manifest of ``data.dir`` and None, or None and a warning saying what is missing (task mode reads
    no shards: None, None)."""
    if cfg.task.name:
        return None, None
    if not cfg.data.dir:
        return None, "data.dir is empty: give the folder made by `python -m data_prep prepare`"
    manifest = Path(cfg.data.dir) / "manifest.json"
    try:
        return json.loads(manifest.read_text()), None
    except FileNotFoundError:
        return None, f"data.dir {cfg.data.dir!r}: no {manifest.name} here (run `python -m data_prep prepare` first)"
    except (OSError, ValueError) as e:
        return None, f"data.dir {cfg.data.dir!r}: {manifest.name} unreadable ({e}); run `python -m data_prep verify`"


def plan_lines(cfg: RunConfig, world_size: int, manifest: dict[str, Any] | None) -> list[str]:
    """Human-readable lines of the derived plan for ``world_size`` data-parallel ranks.

    Raises:
        ConfigError: the batch arithmetic cannot hold for that world size (:func:`pretrain.ds_config.batch_sizes`).
    """
    plan = ds_config.batch_sizes(cfg.deepspeed, world_size)
    steps = cfg.train.max_steps
    sequences = steps * plan.train_batch_size
    lines = [
        f"plan for {world_size} rank(s): micro-batch {plan.micro_batch} sequences x accumulation {plan.accumulation} "
        f"x {world_size} rank(s) = {plan.train_batch_size} sequences per step",
        f"{steps} steps = {sequences:,} sequences",
        f"precision {ds_config.precision(cfg.deepspeed)}, ZeRO stage {ds_config.zero_stage(cfg.deepspeed)}",
    ]
    if manifest is not None and "max_seq_length" in manifest:
        seq = int(manifest["max_seq_length"])
        train = (manifest.get("splits") or {}).get("train") or {}
        epoch = train.get("num_sequences")
        tokens = f"at most {sequences * seq:,} tokens (max_seq_length {seq})"
        if isinstance(epoch, int) and epoch > 0:
            tokens += f", {sequences / epoch:.2f} epochs of the {epoch:,} train sequences"
        lines.append(tokens)
    return lines


def check_and_plan(cfg: RunConfig, world_size: int) -> tuple[list[str], list[str]]:
    """The checks that read disk and the plan: returns (plan lines, warnings).

    Raises:
        ConfigError: layer indices out of range for the teacher, or batch arithmetic impossible for ``world_size``.
    """
    lines: list[str] = []
    warnings: list[str] = []
    tconf = teacher_config(cfg)
    n = getattr(tconf, "num_hidden_layers", None)
    if tconf is None or not isinstance(n, int):
        warnings.append(
            f"teacher.name_or_path {cfg.teacher.name_or_path!r}: config not readable here (no local copy): "
            "student.layers not checked against its depth"
        )
    else:
        lines.append(f"student keeps teacher layers {check_layers(cfg, tconf)} of {n}")
    manifest, warning = read_manifest(cfg)
    if warning:
        warnings.append(warning)
    return lines + plan_lines(cfg, world_size, manifest), warnings


__all__ = ["check_and_plan", "check_layers", "plan_lines", "read_manifest", "teacher_config", "teacher_layers"]
