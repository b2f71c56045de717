"""Task distillation's checks before any weights load, and the student built from a task-agnostic encoder.

Each function takes the config sections it reads (:class:`pretrain.config.TaskConfig`, ``TeacherConfig``, the
student's layer map), not the whole run config, and raises :class:`pretrain.schema.ConfigError` naming the key and
what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pretrain.schema import ConfigError
from pretrain.tasks.base import MEAN_HEAD_FILE, REGRESSION, LocalFields, SplitConfig, Task, TaskError, slug
from pretrain.tasks.registry import load_task

if TYPE_CHECKING:
    from pretrain.config import TaskConfig, TeacherConfig

CLASSIFIER_SUFFIX = "ForSequenceClassification"


def load_teacher_files(teacher: TeacherConfig) -> tuple[str, Any, Any]:
    """(resolved path, config, tokenizer) of the teacher. Raises :class:`ConfigError` when it cannot be loaded."""
    from transformers import AutoConfig, AutoTokenizer

    from data_prep.embedded import resolve_model
    from data_prep.errors import DataPrepError

    name = teacher.name_or_path
    try:
        path = resolve_model(name)
        tconf = AutoConfig.from_pretrained(path, revision=teacher.revision)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=teacher.revision)
    except (DataPrepError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"teacher.name_or_path: {name!r} cannot be loaded ({first})") from None
    return path, tconf, tokenizer


def load_task_of(tc: TaskConfig) -> Task:
    """The task of the ``task`` section with its split seed, caps and local field names. Raises
    :class:`ConfigError` naming ``task.name``."""
    from data_prep.errors import DataPrepError

    if not tc.name:
        raise ConfigError("task.name: is null; task distillation needs a task (see docs/task-distillation.md)")
    try:
        return load_task(
            tc.name,
            split=SplitConfig(seed=tc.split_seed, max_train=tc.max_train_examples, max_eval=tc.max_eval_examples),
            fields=LocalFields(
                tc.text_field,
                tc.pair_field,
                tc.label_field,
                flags=("task.text_field", "task.pair_field", "task.label_field"),
            ),
        )
    except (TaskError, DataPrepError) as e:
        raise ConfigError(f"task.name: {e}") from None


def check_teacher(tconf: Any, name: str, task: Task) -> None:
    """The teacher (config ``tconf`` of ``teacher.name_or_path`` ``name``) is a classifier of the task's outputs and
    label order. Raises :class:`ConfigError` saying how to make one."""
    archs = getattr(tconf, "architectures", None) or []
    if not any(a.endswith(CLASSIFIER_SUFFIX) for a in archs):
        make = (
            f"`python -m pretrain.downstream --task {task.name} --model teacher={name} --seeds 1 --head cls "
            f"--save-model DIR` and give teacher.name_or_path=DIR/teacher/{slug(task.name)}"
        )
        if (Path(name) / MEAN_HEAD_FILE).is_file():
            raise ConfigError(
                f"teacher.name_or_path: {name!r} was fine-tuned with --head mean (its head, {MEAN_HEAD_FILE}, "
                f"pools the mean of the tokens, which a transformers *ForSequenceClassification cannot hold); task "
                f"distillation copies a [CLS]-pooler head: fine-tune the teacher with {make}"
            )
        raise ConfigError(
            f"teacher.name_or_path: {name!r} has no classification head (architectures {archs}); task "
            f"distillation needs a teacher fine-tuned on {task.name}: make one with {make}"
        )
    regression = task.kind == REGRESSION
    if (tconf.num_labels == 1) != regression or tconf.num_labels != task.num_labels:
        raise ConfigError(
            f"teacher.name_or_path: {name!r} has a head of {tconf.num_labels} output(s) "
            f"({getattr(tconf, 'problem_type', None) or 'classification'}), the task {task.name} is a "
            f"{task.kind} with {task.num_labels} output(s); use a teacher fine-tuned on this task"
        )
    names = [tconf.id2label[i] for i in range(tconf.num_labels)]
    generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    if not regression and not generic and names != list(task.label_names):
        raise ConfigError(
            f"teacher.name_or_path: {name!r} names its classes {names}, the task {task.name} "
            f"{list(task.label_names)}; use a teacher fine-tuned on this task (same label order)"
        )


def check_loss(loss: Any, task: Task) -> None:
    """The logit terms of ``loss`` (:class:`pretrain.losses.LossConfig`) suit the task: a regression head has one
    output, so ``alpha_prob_cos`` (the cosine of softmax distributions over the outputs, always 1 there) would be a
    constant 0 with no gradient. Raises :class:`ConfigError` naming ``loss.alpha_prob_cos``."""
    if task.kind == REGRESSION and loss.alpha_prob_cos > 0:
        raise ConfigError(
            f"loss.alpha_prob_cos: {loss.alpha_prob_cos} on the regression task {task.name}: the softmax of one "
            "output is always 1, so this term is 0 with no gradient; set loss.alpha_prob_cos=0 and use alpha_ce "
            "(MSE to the teacher's score) or alpha_label (MSE to the gold score)"
        )


def check_student(tc: TaskConfig, layers: Any, tconf: Any) -> None:
    """``task.student`` is a model of the teacher's vocabulary whose depth matches ``student.layers`` (``layers``).
    Raises :class:`ConfigError`."""
    from transformers import AutoConfig

    from pretrain.student import resolve_layer_map

    path = Path(str(tc.student))
    try:
        sconf = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"task.student: {str(path)!r} is not a model directory ({e}); give a run's student/ folder"
        ) from None
    if sconf.vocab_size != tconf.vocab_size:
        raise ConfigError(
            f"task.student: {str(path)!r} has a vocabulary of {sconf.vocab_size} tokens, the "
            f"teacher {tconf.vocab_size}; distil a student of this teacher (same tokenizer)"
        )
    depth = len(resolve_layer_map(layers, tconf.num_hidden_layers))
    if sconf.num_hidden_layers != depth:
        raise ConfigError(
            f"student.layers: {layers!r} gives {depth} layers, task.student has "
            f"{sconf.num_hidden_layers}; set student.layers to the layer map it was distilled with"
        )


def check_eval_split(tc: TaskConfig, task: Task) -> None:
    """``task.eval_split`` is one of the task's splits. Raises :class:`ConfigError`."""
    if tc.eval_split not in task.splits:
        raise ConfigError(
            f"task.eval_split: {task.name} has no {tc.eval_split!r} split (splits: {sorted(task.splits)})"
        )


def pretrained_student(tc: TaskConfig, teacher: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The classifier on ``task.student`` (a task-agnostic distilled encoder) with the teacher's head copied
    (``task.head`` "teacher", when the widths match) or a new one; fp32, train mode. Returns (student, record).
    Raises :class:`ConfigError` when the teacher's head does not fit."""
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(
        tc.student, num_labels=teacher.config.num_labels, dtype=torch.float32
    )
    copied: dict[str, str] = {}
    notes = [f"encoder from {tc.student}"]
    t_state = teacher.state_dict()
    base = student.base_model_prefix
    head = {
        k: v for k, v in student.state_dict().items() if not k.startswith(base + ".") or k.startswith(f"{base}.pooler.")
    }
    if tc.head == "teacher":
        fits = all(k in t_state and t_state[k].shape == v.shape for k, v in head.items())
        if not fits:
            raise ConfigError(
                f"task.head: the teacher's head does not fit the student from {tc.student} "
                f"(other widths); use task.head='new'"
            )
        student.load_state_dict({k: t_state[k] for k in head}, strict=False)
        copied = {k: k for k in head}
        notes.append("classification head copied from the teacher")
    else:
        notes.append("new classification head (random, seeded)")
    return student.float().train(), {
        "copied": copied,
        "initialized": [] if copied else sorted(head),
        "notes": notes,
        "init": "task.student",
        "student_class": type(student).__name__,
    }
