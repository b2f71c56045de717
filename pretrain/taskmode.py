"""``python -m pretrain.taskmode evaluate``: saved classifiers scored on a task split; and task distillation's names.

An entry point: the code lives in :mod:`pretrain.tasks` (docs/task-distillation.md): the recipe in
:mod:`pretrain.tasks.recipe`, the loss module in :mod:`pretrain.tasks.distill`, the in-run evaluation in
:mod:`pretrain.tasks.validator`, the ``task`` config section in :mod:`pretrain.config`.
"""

import sys

from pretrain.config import LOGIT_TERMS, TaskConfig, check_run_config
from pretrain.tasks.distill import TaskDistillationModel
from pretrain.tasks.examples import Examples, collate, encode
from pretrain.tasks.preflight import CLASSIFIER_SUFFIX
from pretrain.tasks.recipe import TaskRecipe
from pretrain.tasks.scoring import evaluate_classifier
from pretrain.tasks.taskmode_cli import main
from pretrain.tasks.validator import TaskValidator

TaskExamples = Examples  # the former name of the encoded-example type

__all__ = [
    "CLASSIFIER_SUFFIX",
    "LOGIT_TERMS",
    "Examples",
    "TaskConfig",
    "TaskDistillationModel",
    "TaskExamples",
    "TaskRecipe",
    "TaskValidator",
    "check_run_config",
    "collate",
    "encode",
    "evaluate_classifier",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
