"""Labeled tasks: one home for everything that reads, encodes, fine-tunes, probes, distils or scores labeled examples.

Importing :mod:`pretrain.tasks` loads only the registry side (numpy, no torch): the task types, loading, splits and
metrics. The modules that need torch are imported by name:

- :mod:`pretrain.tasks.base` (Task, Split, SplitConfig, LocalFields, TaskError), :mod:`~pretrain.tasks.registry`
  (:func:`load_task`, the known specs), :mod:`~pretrain.tasks.splits`, :mod:`~pretrain.tasks.metrics` and the sources
  :mod:`~pretrain.tasks.embedded`, :mod:`~pretrain.tasks.glue`, :mod:`~pretrain.tasks.local`;
- :mod:`~pretrain.tasks.examples`: the one encoded-example type, tokenizer encoding, segment-id rule, collation and
  batch orders; :mod:`~pretrain.tasks.predict`: the one prediction loop;
- :mod:`~pretrain.tasks.models` (model specs, checks, the truncation baseline), :mod:`~pretrain.tasks.finetune`,
  :mod:`~pretrain.tasks.probe`, :mod:`~pretrain.tasks.summary` (aggregates, markdown, plot),
  :mod:`~pretrain.tasks.downstream` (``run_downstream``) and :mod:`~pretrain.tasks.downstream_cli`;
- task distillation: :mod:`~pretrain.tasks.distill` (the loss module), :mod:`~pretrain.tasks.recipe` (TaskRecipe),
  :mod:`~pretrain.tasks.validator` (in-run evaluation), :mod:`~pretrain.tasks.scoring` (saved classifiers) and
  :mod:`~pretrain.tasks.taskmode_cli`. The ``task`` config section is :class:`pretrain.config.TaskConfig`.
"""

from pretrain.tasks.base import CLASSIFICATION, REGRESSION, LocalFields, Split, SplitConfig, Task, TaskError
from pretrain.tasks.embedded import EMBEDDED, WIKI_HELDOUT
from pretrain.tasks.glue import GLUE
from pretrain.tasks.metrics import compute_metrics, score
from pretrain.tasks.registry import DEFAULT_TASK, OFFLINE_TASKS, known_tasks, load_task
from pretrain.tasks.splits import deduplicate, make_splits, normalise

__all__ = [
    "CLASSIFICATION",
    "DEFAULT_TASK",
    "EMBEDDED",
    "GLUE",
    "OFFLINE_TASKS",
    "REGRESSION",
    "WIKI_HELDOUT",
    "LocalFields",
    "Split",
    "SplitConfig",
    "Task",
    "TaskError",
    "compute_metrics",
    "deduplicate",
    "known_tasks",
    "load_task",
    "make_splits",
    "normalise",
    "score",
]
