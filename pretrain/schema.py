"""Typed config sections: strict loading from JSON-like dicts, dotted overrides, clear errors.

Every config section of the project is a dataclass whose fields are declared with :func:`param`, which stores the
field's documentation (units, default, source) in ``field.metadata["help"]``. The configuration reference in the
README is generated from that text (``python -m pretrain.config --reference``), so the docs cannot drift from code.

Components own their sections (Meta Lingua style): ``pretrain.masking.MaskingConfig``, ``pretrain.losses.LossConfig``,
``pretrain.student.StudentConfig``, ``pretrain.data.DataConfig``; ``pretrain.config.RunConfig`` assembles them.
A section validates its own values in ``validate()`` and raises :class:`ConfigError` naming ``section.key``, the value
and what to do. Never ``assert`` on user input.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from data_prep.errors import DistillError


class ConfigError(DistillError, ValueError):
    """A user-facing configuration error: names the file/section/key, the bad value and what to do."""

    exit_code = 2


def param(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING) -> Any:
    """Declare a config field with its documentation.

    Args:
        default: the default value (immutable), or leave unset and give ``default_factory``.
        help: one or two sentences: meaning, units, default's source (paper / project).
        default_factory: for mutable defaults (lists, dicts).
    """
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str, list[...], dict, Optional, Union, Any)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        names = [_type_name(a) for a in args if a is not type(None)] + (["null"] if type(None) in args else [])
        raise ConfigError(f"{where}: {value!r} is not a valid {' or '.join(names)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    return value


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str) -> Any:
    """Build dataclass ``cls`` from ``data`` strictly: unknown keys and wrong types raise :class:`ConfigError`.

    ``where`` is the section's name (for example ``"masking"`` or ``"configs/x.json: masking"``) used in messages.
    Calls ``validate()`` on the result when the class defines it.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected an object, got {data!r}")
    data = dict(data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}{did_you_mean(unknown, fields)}; valid keys are {sorted(fields)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: required key(s) {missing} missing")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def did_you_mean(unknown: Iterable[str], valid: Iterable[str]) -> str:
    """``" (did you mean 'max_steps'?)"`` for the unknown keys that are near misses of a valid one (difflib ratio >=
    0.6), else ``""``."""
    choices = sorted(valid)
    hints = [f"{k!r} -> {m[0]!r}" for k in unknown if (m := difflib.get_close_matches(k, choices, n=1, cutoff=0.6))]
    if not hints:
        return ""
    if len(hints) == 1:
        return f" (did you mean {hints[0].split(' -> ')[1]}?)"
    return f" (did you mean {', '.join(hints)}?)"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``section.key=value`` command-line override.

    The value is read as JSON when it parses (``3``, ``0.5``, ``true``, ``[0, 2]``, ``null``, ``"x"``), else taken as
    a plain string (``train.output_dir=runs/x``). Raises :class:`ConfigError` for text without ``=`` or a dot.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, for example train.max_steps=100")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override {text!r}: the key must be dotted, section.key (for example loss.alpha_ce=5.0)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a raw config dict (returns a new dict; nested keys allowed)."""
    out = json.loads(json.dumps(raw))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = node[part]
        node[path[-1]] = value
    return out


def check(cond: bool, where: str, message: str) -> None:
    """Raise :class:`ConfigError` ``"{where}: {message}"`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{where}: {message}")


def reference_markdown(sections: Mapping[str, type]) -> str:
    """Markdown tables (one per section) of every field: name, type, default, help."""
    lines = []
    for name, cls in sections.items():
        lines += [
            f"### `{name}`",
            "",
            (cls.__doc__ or "").strip().split("\n\n")[0],
            "",
            "| key | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = json.dumps(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = json.dumps(f.default_factory())
            else:
                default = "required"
            help_text = f.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
            tp = hints[f.name]
            tp = (tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")).replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{tp}` | `{default}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)
