"""The ``deepspeed`` section checked against DeepSpeed's own schema, for the installed DeepSpeed version.

DeepSpeed ignores a key it does not read, so ``zero_optimizaton`` (a typo) silently means ZeRO-0. This module refuses
such keys with a "did you mean" suggestion, using DeepSpeed itself as the reference rather than a list of our own:

- **Top-level keys**: the keys that ``deepspeed.runtime.config.DeepSpeedConfig`` reads, recorded once per process by
  parsing a minimal config through a dictionary that notes every key looked up (``get``, ``in``, ``[]``,
  ``keys()``). A key DeepSpeed never looks up has no effect, so it is refused.
- **Sections with a pydantic model** (``zero_optimization``, ``bf16``, ``fp16``, ``compile``, ``tensorboard``,
  ``wandb``, ``csv_monitor``, ``comet``, ``comms_logger``): validated by DeepSpeed's model itself (``extra="forbid"``),
  its errors (unknown key, wrong type, value outside an enum) reported as ``deepspeed.<section>.<key>``.

Sections that DeepSpeed reads as free-form dictionaries (``optimizer.params`` goes to the optimizer's constructor)
keep the range checks of :mod:`pretrain.ds_config`.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import io
import logging
import sys
from collections.abc import Iterator
from typing import Any

from pretrain.schema import ConfigError

# section -> (module, class) of DeepSpeed's pydantic model for it (DeepSpeed 0.16-0.19)
MODELS: dict[str, tuple[str, str]] = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "compile": ("deepspeed.compile.config", "CompileConfig"),
    "tensorboard": ("deepspeed.monitor.config", "TensorBoardConfig"),
    "wandb": ("deepspeed.monitor.config", "WandbConfig"),
    "csv_monitor": ("deepspeed.monitor.config", "CSVConfig"),
    "comet": ("deepspeed.monitor.config", "CometConfig"),
    "comms_logger": ("deepspeed.comm.config", "CommsLoggerConfig"),
}


class _Recorder(dict):
    """A dict that adds every key looked up in it to ``seen`` (DeepSpeed reads its config with ``get``, ``in``,
    ``[]`` and ``key in d.keys()``)."""

    def __init__(self, data: dict, seen: set[str]):
        super().__init__(data)
        self.seen = seen

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.seen.add(str(key))
        return super().__contains__(key)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().setdefault(key, default)

    def keys(self) -> Any:
        return _RecordingKeys(self)


class _RecordingKeys:
    def __init__(self, owner: _Recorder):
        self.owner = owner

    def __contains__(self, key: object) -> bool:
        return key in self.owner

    def __iter__(self) -> Iterator[Any]:
        return iter(dict(self.owner))

    def __len__(self) -> int:
        return len(dict(self.owner))


@functools.cache
def top_level_keys() -> frozenset[str]:
    """The top-level keys the installed DeepSpeed reads from a config (about 60 for DeepSpeed 0.19).

    Recorded by constructing ``DeepSpeedConfig`` from a minimal batch-only config wrapped in a recording dict; no
    distributed setup is needed. Cached per process (about 0.1 s after DeepSpeed is imported).
    """
    seen: set[str] = set()
    minimal = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    with _stdout_to_stderr():
        from deepspeed.runtime.config import DeepSpeedConfig

        DeepSpeedConfig(_Recorder(minimal, seen))
    return frozenset(seen)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Keep stdout clean while DeepSpeed is imported for a config check (``python -m pretrain.config`` prints JSON
    there): DeepSpeed logs its accelerator choice to stdout on import. What it prints goes to stderr instead, and a
    DeepSpeed logger created meanwhile gets stdout back as its stream, so a training run's logs go where they did."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    sys.stderr.write(buf.getvalue())
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is buf:
            handler.setStream(sys.stdout)


def _suggest(key: str, valid: set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_fields(model: Any) -> set[str]:
    names = set(model.model_fields)
    names |= {f.alias for f in model.model_fields.values() if f.alias}
    return names


def _check_section(name: str, value: Any) -> None:
    module, cls_name = MODELS[name]
    model = getattr(importlib.import_module(module), cls_name)
    if not isinstance(value, dict):
        raise ConfigError(f"deepspeed.{name}: {value!r} must be an object (DeepSpeed's {cls_name})")
    from pydantic import ValidationError

    try:
        model(**value)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in (name, *err["loc"]))
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            raise ConfigError(
                f"deepspeed.{where}: unknown key{_suggest(key, _model_fields(model))} "
                f"(valid keys of {cls_name}: {sorted(model.model_fields)})"
            ) from None
        raise ConfigError(f"deepspeed.{where}: {err.get('input')!r} is not valid: {err['msg']}") from None


def check(ds: dict) -> None:
    """Refuse keys of the ``deepspeed`` section that the installed DeepSpeed does not read, and validate the sections
    that DeepSpeed describes with a pydantic model (:data:`MODELS`) by that model.

    Args:
        ds: the run config's ``deepspeed`` section, as written.

    Raises:
        ConfigError: naming ``deepspeed.<key>`` (or ``deepspeed.<section>.<key>``), with a "did you mean" suggestion
            for a near miss and the valid keys.
    """
    known = top_level_keys()
    unknown = sorted(k for k in ds if k not in known)
    if unknown:
        hints = [f"deepspeed.{k}: unknown key{_suggest(k, known)}" for k in unknown]
        listing = "" if all("did you mean" in h for h in hints) else f"; valid top-level keys: {sorted(known)}"
        raise ConfigError(f"{'; '.join(hints)} (DeepSpeed ignores keys it does not read{listing})")
    for name in MODELS:
        if name in ds:
            _check_section(name, ds[name])
