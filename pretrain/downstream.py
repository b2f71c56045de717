"""``python -m pretrain.downstream``: fine-tune (or probe) teacher, baselines and distilled student on labeled tasks.

An entry point: the code lives in :mod:`pretrain.tasks` (docs/downstream.md); the names below are re-exported for
library callers (``run_downstream``, ``render_downstream_markdown``, ...).
"""

import sys

from pretrain.tasks.base import DownstreamError
from pretrain.tasks.downstream import RESULT_VERSION, RUN_ROLES, run_downstream, slug
from pretrain.tasks.downstream_cli import main, parse_args
from pretrain.tasks.examples import Examples, collate, encode, length_grouped_batches, sorted_batches, uses_segment_ids
from pretrain.tasks.finetune import (
    CPU_DEFAULTS,
    GLUE_DEFAULTS,
    FinetuneConfig,
    MeanPoolClassifier,
    defaults_for,
    finetune,
)
from pretrain.tasks.models import ModelSpec, build_truncation_baseline, check_model, run_models
from pretrain.tasks.probe import PROBE_ALPHA, PROBE_C, embed, probe
from pretrain.tasks.summary import plot_downstream, render_downstream_markdown, summarise, write_outputs

Encoded = Examples  # the former name of the encoded-example type

__all__ = [
    "CPU_DEFAULTS",
    "GLUE_DEFAULTS",
    "PROBE_ALPHA",
    "PROBE_C",
    "RESULT_VERSION",
    "RUN_ROLES",
    "DownstreamError",
    "Encoded",
    "Examples",
    "FinetuneConfig",
    "MeanPoolClassifier",
    "ModelSpec",
    "build_truncation_baseline",
    "check_model",
    "collate",
    "defaults_for",
    "embed",
    "encode",
    "finetune",
    "length_grouped_batches",
    "main",
    "parse_args",
    "plot_downstream",
    "probe",
    "render_downstream_markdown",
    "run_downstream",
    "run_models",
    "slug",
    "sorted_batches",
    "summarise",
    "uses_segment_ids",
    "write_outputs",
]

if __name__ == "__main__":
    sys.exit(main())
