"""The models under evaluation and the baselines: model specs and their checks, the run's default models and the
top-layer truncation baseline (Sajjad et al. 2020, "Poor Man's BERT")."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data_prep.embedded import resolve_model
from data_prep.errors import DataPrepError
from data_prep.files import atomic_dir
from pretrain.card import write_card
from pretrain.tasks.base import DownstreamError

log = logging.getLogger("pretrain.downstream")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; any other name as ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclasses.dataclass
class ModelSpec:
    """A model under evaluation: display ``name``, loadable ``path`` (local folder or hub name), encoder ``params``
    (embeddings + layers, pooler and heads excluded) and ``layers``, filled by :func:`check_model`."""

    name: str
    path: str
    params: int = 0
    layers: int = 0
    hidden: int = 0


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (newly initialised heads are expected here)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_model(spec: ModelSpec) -> ModelSpec:
    """Resolve ``embedded:NAME``, load the config, tokenizer and weights of ``spec.path`` once; fill params / layers.

    Raises:
        DownstreamError: the path is not a loadable Hugging Face model (names the model and what failed).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        spec.path = resolve_model(spec.path)
    except DataPrepError as e:
        raise DownstreamError(f"model {spec.name}={spec.path}: {e}") from None
    p = Path(spec.path).expanduser()
    if p.exists() and not (p / "config.json").is_file():
        raise DownstreamError(
            f"model {spec.name}={spec.path}: no config.json; give a Hugging Face model directory "
            "(RUN/student, RUN/student_init) or a hub name"
        )
    try:
        with quiet_transformers():
            AutoConfig.from_pretrained(spec.path)
            AutoTokenizer.from_pretrained(spec.path)
            model = AutoModel.from_pretrained(spec.path)
    except Exception as e:
        raise DownstreamError(
            f"model {spec.name}={spec.path} does not load ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}); give a Hugging Face model "
            "directory with config.json, weights and tokenizer files, or a reachable hub name"
        ) from None
    spec.params = sum(t.numel() for n, t in model.named_parameters() if not n.startswith("pooler."))
    spec.layers = int(model.config.num_hidden_layers)
    spec.hidden = int(model.config.hidden_size)
    return spec


def build_truncation_baseline(teacher_path: str, k: int, out: str | os.PathLike) -> Path:
    """Save the teacher's first ``k`` layers (embeddings, layers 0..k-1, pooler if any) as a model folder ``out``.

    Built with the project's student builder (:func:`pretrain.student.build_student` with
    ``StudentConfig(layers=list(range(k)))``, architecture "same", init "teacher"): the "top-layer dropping" baseline
    of Sajjad et al. (2020), which comes within a few GLUE points of DistilBERT without distillation. The teacher is
    loaded with ``AutoModel`` (no MLM head: fine-tuning adds its own head). Written to a temporary sibling folder and
    renamed into place. Returns ``out``.

    Raises:
        DownstreamError: the teacher does not load or has fewer than ``k`` layers.
    """
    from transformers import AutoModel, AutoTokenizer

    from pretrain.student import StudentConfig, build_student

    out = Path(out)
    try:
        with quiet_transformers():
            teacher = AutoModel.from_pretrained(teacher_path)
            tok = AutoTokenizer.from_pretrained(teacher_path)
    except Exception as e:
        raise DownstreamError(f"truncation baseline: the teacher {teacher_path} does not load ({e})") from None
    n = teacher.config.num_hidden_layers
    if not 0 < k <= n:
        raise DownstreamError(f"truncation baseline: k={k} layers, but the teacher {teacher_path} has {n}")
    student: Any = build_student(teacher, StudentConfig(layers=list(range(k))))[0]  # a Hugging Face model
    source = (teacher_path,) if Path(teacher_path).is_dir() else ()
    with atomic_dir(out, what=f"truncation baseline ({k} layers of {teacher_path})", inputs=source) as tmp:
        with quiet_transformers():
            student.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        (tmp / "truncation.json").write_text(
            json.dumps(
                {
                    "teacher": str(teacher_path),
                    "layers": list(range(k)),
                    "built_with": "pretrain.student.build_student",
                },
                indent=1,
            )
        )
        write_card(tmp, final=out)  # README.md: the teacher and the layers kept (pretrain.card)
    return out


def run_models(run_dir: str | os.PathLike, output: str | os.PathLike) -> list[ModelSpec]:
    """The default models of a run directory, in table order: ``teacher``, ``student_init``, ``truncation``,
    ``student`` (the ones present; the truncation baseline is built under ``output/models/truncation`` with
    k = the student's depth, reused when it is there for the same teacher and k).

    Raises:
        DownstreamError: ``run_dir`` has no ``config.json`` or neither ``student/`` nor ``student_init/``.
    """
    from transformers import AutoConfig

    run = Path(run_dir)
    teacher, teacher_path = _run_teacher(run)
    students = [d for d in ("student", "student_init") if (run / d / "config.json").is_file()]
    if not students:
        raise DownstreamError(f"--run {run}: no student/ or student_init/ model folder (the trainer exports them)")
    k = int(AutoConfig.from_pretrained(run / students[0]).num_hidden_layers)
    trunc = Path(output) / "models" / "truncation"
    if not _truncation_is_current(trunc, teacher_path, k):
        log.info("building the truncation baseline: the first %d layers of %s -> %s", k, teacher, trunc)
        build_truncation_baseline(teacher_path, k, trunc)
    specs = [ModelSpec("teacher", teacher_path)]
    if "student_init" in students:
        specs.append(ModelSpec("student_init", str(run / "student_init")))
    specs.append(ModelSpec("truncation", str(trunc)))
    if "student" in students:
        specs.append(ModelSpec("student", str(run / "student")))
    return specs


def _run_teacher(run: Path) -> tuple[str, str]:
    """(``teacher.name_or_path`` of ``RUN/config.json``, its resolved path). Raises :class:`DownstreamError`."""
    try:
        cfg = json.loads((run / "config.json").read_text())
        teacher = cfg["teacher"]["name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DownstreamError(
            f"--run {run}: cannot read teacher.name_or_path from {run / 'config.json'} ({e}); "
            "give the output_dir of a distillation run"
        ) from None
    try:
        return teacher, resolve_model(teacher)
    except DataPrepError as e:
        raise DownstreamError(f"--run {run}: teacher {teacher}: {e}") from None


def _truncation_is_current(trunc: Path, teacher_path: str, k: int) -> bool:
    """True when ``trunc/truncation.json`` records the same teacher and first ``k`` layers."""
    want = {"teacher": str(teacher_path), "layers": list(range(k))}
    try:
        have = json.loads((trunc / "truncation.json").read_text())
    except (OSError, ValueError):
        return False
    return {key: have.get(key) for key in want} == want
