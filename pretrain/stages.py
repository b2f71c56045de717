"""Stages: a run as a list of (steps, loss weights) run in order on one run directory (two-step distillation).

TinyBERT (Jiao et al. 2020, sec. 3.2) distils a task in two steps: first the intermediate layers (hidden-state and
attention losses), then the prediction layer (soft cross-entropy on the teacher's logits). ``train.stages`` expresses
that in one config: each stage has its steps and the loss weights that replace the ``loss`` section's for those steps;
stage k+1 starts from stage k's weights (the same parameters, optimizer and learning-rate schedule continue), and a
resume inside any stage continues it, because the stage of a step is a function of the step alone. The steps of the
stages add up to ``train.max_steps``. Without ``train.stages`` the run is one stage with the ``loss`` section.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from pretrain.schema import ConfigError, check, param

if TYPE_CHECKING:
    from pretrain.config import RunConfig, TrainConfig
    from pretrain.losses import LossConfig


@dataclasses.dataclass
class StageConfig:
    """One stage of ``train.stages``."""

    steps: int = param(help="Optimizer steps of this stage.")
    name: str | None = param(None, help='A name for the logs, e.g. "intermediate" or "prediction".')
    loss: dict = param(
        default_factory=dict,
        help='Loss keys that replace the loss section\'s during this stage, e.g. {"alpha_ce": 0, "alpha_mse": 1}.',
    )

    def validate(self) -> None:
        check(self.steps >= 1, "train.stages[].steps", f"{self.steps} must be >= 1")


def stage_losses(train: TrainConfig | RunConfig, loss: LossConfig | None = None) -> list[LossConfig]:
    """The :class:`pretrain.losses.LossConfig` of each stage of the ``train`` section (``train.stages``, or one stage
    with the ``loss`` section), validated; raises :class:`ConfigError` naming ``train.stages[i]`` for unknown loss
    keys, bad values, a stage without any loss term, or steps that do not add up to ``train.max_steps``.

    ``stage_losses(cfg)`` with a whole RunConfig (the older form) reads its train and loss sections.
    """
    from pretrain import schema
    from pretrain.config import TrainConfig
    from pretrain.losses import LossConfig

    if not isinstance(train, TrainConfig):  # a whole RunConfig
        run = train
        train, loss = run.train, run.loss
    if loss is None:
        raise TypeError("stage_losses(train, loss): the loss section is missing")
    stages = train.stages
    if stages is None:
        return [loss]
    check(
        len(stages) > 0,
        "train.stages",
        "the list is empty; give at least one stage, or null for one stage with the loss section",
    )
    total = sum(s.steps for s in stages)
    check(
        total == train.max_steps,
        "train.stages",
        f"the stages' steps add up to {total} ({' + '.join(str(s.steps) for s in stages)}), train.max_steps is "
        f"{train.max_steps}; make them equal",
    )
    out = []
    base = dataclasses.asdict(loss)
    for i, stage in enumerate(stages):
        weights = schema.from_dict(LossConfig, {**base, **stage.loss}, f"train.stages[{i}].loss")
        if not weights.active():
            raise ConfigError(f"train.stages[{i}].loss: every loss weight is 0; give the stage at least one term")
        out.append(weights)
    return out


class Stages:
    """The stage schedule of a run: which loss weights apply at each step.

    Args:
        train: the validated train section (``stages``, ``max_steps``); loss: the loss section.
    """

    def __init__(self, train: TrainConfig, loss: LossConfig):
        self.losses = stage_losses(train, loss)
        self.names: list[str | None] = [s.name or f"stage {i + 1}" for i, s in enumerate(train.stages or [])] or [None]
        steps = [s.steps for s in train.stages] if train.stages else [train.max_steps]
        self.starts = [sum(steps[:i]) for i in range(len(steps))]

    def index(self, step: int) -> int:
        """The stage (0-based) that optimizer step ``step`` (0-based: the step being taken) belongs to."""
        return max(i for i, start in enumerate(self.starts) if step >= start)

    def loss_union(self):
        """A LossConfig whose weights are the largest of every stage (the module builds every part any stage uses:
        projections, relation hooks); the weights used at a step come from :meth:`apply`."""
        if len(self.losses) == 1:
            return self.losses[0]
        union: dict[str, Any] = dataclasses.asdict(self.losses[0])
        for loss in self.losses[1:]:
            for k, v in dataclasses.asdict(loss).items():
                if k.startswith("alpha_"):
                    union[k] = max(union[k], v)
        return dataclasses.replace(self.losses[0], **union)

    def apply(self, model, step: int) -> int:
        """Give ``model`` (its ``loss_cfg``) the loss weights of the stage of ``step``; returns the stage index."""
        i = self.index(step)
        model.loss_cfg = self.losses[i]
        return i
