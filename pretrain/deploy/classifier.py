"""A sequence classifier deployed and checked on its labeled task: ONNX fp32 and int8 with accuracy on dev and test.

:func:`export_classifier` writes ``OUT/model.onnx`` and ``OUT/model_qint8_<isa>.onnx`` (sentence-transformers' /
optimum's ``onnx/`` layout, :mod:`pretrain.deploy.onnx_export`) and ``OUT/checks.json``, and returns every verdict:

- fp32 ONNX vs PyTorch: the largest absolute logit difference at batch 1 and at batch 32 of mixed lengths
  (:func:`pretrain.deploy.verify.check_outputs`, tolerance 1e-4);
- int8 vs fp32 on the task: the task score (accuracy for a single-label task, in points) of both ONNX models on each
  split, scored exactly as ``python -m pretrain.taskmode evaluate`` scores the PyTorch model (the same tokenization,
  segment-id rule, length-sorted padded batches and metrics: :func:`onnx_scores`); the verdict is the largest drop
  over the splits, tolerance 1.0 point (docs/task-distillation.md).

A model outside a tolerance is still written; its check says ``passed: false`` with the number.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from data_prep.files import atomic_dir, atomic_write_text
from pretrain.deploy.common import DeployError, detect_kind, load_tokenizer, load_torch_model
from pretrain.deploy.onnx_export import export_model
from pretrain.deploy.quantize import int8_filename, quantize_int8
from pretrain.deploy.verify import TOLERANCES, CheckResult, OnnxRunner, check_outputs
from pretrain.tasks.base import REGRESSION, Task
from pretrain.tasks.examples import encode, sorted_batches, uses_segment_ids
from pretrain.tasks.metrics import compute_metrics, score
from pretrain.tasks.predict import predictions, run_batches

Quantizer = Callable[[Path, Path], Path]  # (fp32 ONNX path, int8 path to write) -> the int8 path


class OnnxClassifier:
    """An ONNX classifier called like a Hugging Face one (``model(input_ids=..., attention_mask=...)`` with int64
    tensors ``[batch, seq]``), returning an object whose ``logits`` is a float32 tensor ``[batch, labels]``; so
    :func:`pretrain.tasks.predict.run_batches` runs it as it runs the PyTorch model."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.runner = OnnxRunner(path, threads=threads)

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        logits = self.runner({k: v.cpu().numpy() for k, v in batch.items()})
        return SimpleNamespace(logits=torch.from_numpy(logits))


def onnx_scores(
    onnx_path: str | Path,
    tokenizer: Any,
    task: Task,
    splits: Sequence[str],
    *,
    segment_ids: bool,
    max_length: int = 128,
    batch_size: int = 128,
    threads: int | None = None,
) -> dict[str, float]:
    """The task score (a fraction: accuracy for a single-label task, :func:`pretrain.tasks.metrics.score`) of the
    ONNX classifier ``onnx_path`` on each split of ``splits``, as ``evaluate_classifier`` computes it for PyTorch
    (:mod:`pretrain.tasks.scoring`: length-sorted batches of ``batch_size``, padding to a multiple of 8).
    Raises :class:`DeployError` for a split the task does not have."""
    model = OnnxClassifier(onnx_path, threads=threads)
    out = {}
    for split in splits:
        if split not in task.splits:
            raise DeployError(f"{task.name} has no {split!r} split (splits: {sorted(task.splits)})")
        data = encode(tokenizer, task.splits[split], max_length, segment_ids)
        batches = sorted_batches(data.lengths, batch_size)
        logits = run_batches(
            model, data, batches, pad_id=tokenizer.pad_token_id, device="cpu", multiple=8, segment_ids=segment_ids
        )
        metrics = compute_metrics(task.metrics, predictions(logits, task.kind == REGRESSION), data.labels)
        out[split] = score({split: metrics})
    return out


def check_task_int8(
    fp32: dict[str, float], int8: dict[str, float], file: str | Path, tolerance: float = TOLERANCES["classifier"]
) -> CheckResult:
    """int8 vs fp32 on the task: the largest drop in points (``100 * (fp32 - int8)`` of the scores, a fraction each)
    over the splits; ``passed`` when it is at most ``tolerance`` (1.0 point by default). ``detail`` has both scores
    and the drop per split."""
    # rounded: 100 * (0.80 - 0.79) is 1.0000000000000009 in floating point, and exactly 1.0 point must pass
    drops = {s: round(100.0 * (fp32[s] - int8[s]), 9) for s in fp32}
    value = max(drops.values())
    detail = {"fp32": fp32, "int8": int8, "drop_points": drops}
    name = f"int8 task score drop vs fp32 ({', '.join(drops)})"
    return CheckResult(name, float(value), float(tolerance), "points", bool(value <= tolerance), str(file), detail)


def check_texts(task: Task, split: str = "dev", n: int = 64) -> list[str]:
    """``n`` texts of ``split`` for the fp32 check: the first ``n`` in the split's order (mixed lengths)."""
    texts = list(task.splits[split].texts[:n])
    if not texts:
        raise DeployError(f"{task.name}: its {split!r} split has no texts to check the ONNX export on")
    return texts


@dataclasses.dataclass
class ClassifierExport:
    """What :func:`export_classifier` made: the ONNX files (``fp32``, ``int8``), their sizes in bytes, the checks
    (fp32 vs PyTorch, int8 vs fp32 on the task) and the task scores per runtime and split (fractions)."""

    model_dir: Path
    out_dir: Path
    files: dict[str, Path]
    sizes: dict[str, int]
    checks: list[CheckResult]
    scores: dict[str, dict[str, float]]

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(c.passed for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of all of it."""
        return {
            "model_dir": str(self.model_dir),
            "out_dir": str(self.out_dir),
            "files": {k: str(v) for k, v in self.files.items()},
            "sizes": self.sizes,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "scores": self.scores,
            "passed": self.passed,
        }


def export_classifier(
    model_dir: str | Path,
    task: Task,
    out_dir: str | Path | None = None,
    *,
    splits: Sequence[str] = ("dev", "test"),
    tolerance: float = TOLERANCES["fp32"],
    int8_tolerance: float = TOLERANCES["classifier"],
    exporter: str = "dynamo",
    quantize: Quantizer = quantize_int8,
    threads: int | None = None,
) -> ClassifierExport:
    """Export the ``*ForSequenceClassification`` folder ``model_dir`` to ONNX in ``out_dir`` (default
    ``model_dir/onnx``, written atomically), check it against PyTorch on ``task``'s dev texts, quantize it with
    ``quantize`` (dynamic int8 by default) and score both ONNX models on ``splits`` of ``task``. Checks never raise
    (see :attr:`ClassifierExport.passed`).

    Raises :class:`DeployError` for a folder that is not a classifier model, or a split the task does not have.
    """
    model_dir = Path(model_dir)
    if detect_kind(model_dir) != "classifier":
        raise DeployError(f"{model_dir}: not a *ForSequenceClassification model; give a saved classifier")
    missing = [s for s in splits if s not in task.splits]
    if missing:
        raise DeployError(f"{task.name} has no {missing} split(s) (splits: {sorted(task.splits)})")
    model = load_torch_model(model_dir, "classifier")
    tokenizer = load_tokenizer(model_dir)
    segment_ids = uses_segment_ids(model)
    out = Path(out_dir) if out_dir is not None else model_dir / "onnx"
    with atomic_dir(out, overwrite=True) as tmp:
        tmp.chmod(0o755)
        files = {"fp32": export_model(model, "classifier", tmp / "model.onnx", exporter=exporter)}
        checks = [check_outputs(model, "classifier", files["fp32"], tokenizer, check_texts(task), tolerance)]
        files["int8"] = quantize(files["fp32"], tmp / int8_filename())
        scores = {
            k: onnx_scores(p, tokenizer, task, splits, segment_ids=segment_ids, threads=threads)
            for k, p in files.items()
        }
        checks.append(check_task_int8(scores["fp32"], scores["int8"], files["int8"], int8_tolerance))
        sizes = {k: p.stat().st_size for k, p in files.items()}
        for c in checks:
            c.file = str(out / Path(c.file).name)
        atomic_write_text(tmp / "checks.json", json.dumps([dataclasses.asdict(c) for c in checks], indent=2) + "\n")
    final = {k: out / p.name for k, p in files.items()}
    return ClassifierExport(model_dir, out, final, sizes, checks, scores)
