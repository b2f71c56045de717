"""A model card's front matter: ``ModelCardData`` with the measured results as ``model-index`` eval results.

Each number of ``report.json`` (and of a downstream table, a ``--save-model`` folder's metrics, a deployment's
``onnx/checks.json``) becomes one ``EvalResult`` whose ``metric_value`` is the number unchanged and whose
``metric_config`` names the model column, so a reader (and tests/test_card.py) can pair them back. Plus
``base_model``, licence, language, library, pipeline tag, tags and datasets. :mod:`pretrain.card` writes the card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretrain.card_sources import REPORT_KEY, ROLES, CardInputs, hub_id, is_number

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


def _dataset(inp: CardInputs) -> tuple[str, str]:
    """``(dataset_type, dataset_name)`` of the report's held-out split: the shards' sources (local paths reduced to
    their file names)."""
    specs = [source_name(s.get("spec", "")) for s in inp.manifest.get("sources", []) if isinstance(s, dict)]
    split = (inp.report or {}).get("meta", {}).get("split", "valid")
    name = ", ".join(specs) or "the run's shards"
    return (specs[0] if len(specs) == 1 else "bert-distill-shards"), f"held-out '{split}' split of {name}"


def source_name(spec: str) -> str:
    """A manifest source spec as the card names it: a local path reduced to its file name (``text:corpus.txt``)."""
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
            if not is_number(row.get(key)):
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
                if not is_number(value):
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
        if is_number(value)
    ]


def deploy_results(inp: CardInputs) -> list[Any]:
    """``EvalResult``s of the deployment export (``onnx/checks.json``): each check's number (``metric_config``:
    ``onnx-fp32`` / ``onnx-int8``), with its tolerance and verdict in ``metric_args``."""
    from huggingface_hub import EvalResult

    out = []
    for c in inp.checks:
        if not (isinstance(c, dict) and is_number(c.get("value"))):
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
    tags += ["pruned"] if rec.get("init") == "prune" or rec.get("prune") else []
    tags += ["task-distillation"] if task else []
    tags += ["fine-tuned"] if inp.kind == "finetune" else []
    tags += ["onnx"] if (inp.folder / "onnx" / "model.onnx").is_file() or inp.checks else []
    tags += ["int8"] if any("int8" in str(c.get("name", "")).lower() for c in inp.checks if isinstance(c, dict)) else []
    return tags


def card_data(inp: CardInputs) -> Any:
    """The ``ModelCardData`` of the card (front matter; ``model-index`` from :func:`eval_results`)."""
    from huggingface_hub import ModelCardData

    library, pipeline = library_and_pipeline(inp.folder, inp.config)
    specs = [source_name(s.get("spec", "")) for s in inp.manifest.get("sources", []) if isinstance(s, dict)]
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
