"""The run configuration: one JSON file with sections teacher, student, data, masking, loss, train, deepspeed.

Each section is a dataclass owned by its component (``pretrain.student.StudentConfig``, ``pretrain.data.DataConfig``,
``pretrain.masking.MaskingConfig``, ``pretrain.losses.LossConfig``); this module defines :class:`TeacherConfig`,
:class:`TrainConfig` and the task section :class:`TaskConfig` (its schema and checks need no model code, so loading a
config imports no task-distillation module) and assembles them in :class:`RunConfig`. The ``deepspeed`` section is an
ordinary DeepSpeed config (https://www.deepspeed.ai/docs/config-json/); :mod:`pretrain.ds_config` fills in what it
leaves out and checks the batch arithmetic once the world size is known.

Loading is strict (:func:`load`): unknown keys, wrong types and out-of-range values raise
:class:`pretrain.schema.ConfigError` naming the file, ``section.key`` and the value. ``section.key=value`` overrides
from the command line are applied before validation. ``python -m pretrain.config --reference`` prints the markdown
reference of every field; ``python -m pretrain.config CONFIG [overrides]`` validates a file and prints the resolved
config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Literal

from data_prep.cli import HelpFormatter, prog
from pretrain import schema
from pretrain.data import DataConfig
from pretrain.losses import TASK_TERMS, LossConfig
from pretrain.masking import MaskingConfig
from pretrain.schema import ConfigError, check, param
from pretrain.stages import StageConfig, stage_losses
from pretrain.student import StudentConfig

COMMENT_KEYS = ("comment", "_source")  # documented top-level keys that hold prose (sources of hyperparameters)
# the loss terms that read only the student's and the teacher's logits (task distillation can precompute the latter)
LOGIT_TERMS = {"label", "ce", "prob_cos"}


@dataclasses.dataclass
class TeacherConfig:
    """The frozen teacher: a Hugging Face BERT-like encoder, with or without MLM head."""

    name_or_path: str = param(
        help='Hugging Face hub name (e.g. "roberta-base"), local model directory, or "embedded:minilm-l6" / '
        '"embedded:bert-tiny-mlm" (offline assets, see data_prep). A model whose config lists a *ForMaskedLM '
        "architecture is loaded with its MLM head; any other as a bare encoder."
    )
    revision: str | None = param(None, help="Hub revision (branch, tag or commit) of name_or_path; null = default.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = param(
        "auto",
        help='Precision of the teacher, which only runs forward: "auto" = the run\'s half precision on GPU '
        "(deepspeed.fp16 -> float16, deepspeed.bf16 -> bfloat16, else float32) and float32 on CPU.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = param(
        "sdpa",
        help='Attention kernel of the teacher: "sdpa" (PyTorch scaled_dot_product_attention, fast), "eager", or '
        '"flash_attention_2" (GPU with the flash_attn package; otherwise SDPA). A family without an SDPA path '
        "(DeBERTa-v2/v3, MPNet) falls back to eager, saying so once. The student runs the same kernel where its "
        "class has it.",
    )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming ``teacher.<key>``."""
        check(
            bool(self.name_or_path.strip()),
            "teacher.name_or_path",
            "is empty; give a hub name, a local model directory or embedded:NAME",
        )


@dataclasses.dataclass
class TrainConfig:
    """The loop: length, seeds, logging, evaluation, checkpoints and resumption."""

    output_dir: str = param(
        help="Run directory: config.json, metrics.jsonl, tensorboard/, checkpoints/, student_init/, student/. "
        "Running the same command again resumes from its checkpoints/latest."
    )
    max_steps: int = param(
        help="Optimizer steps to train (each step = deepspeed.train_batch_size sequences). Also the length of the "
        "learning-rate schedule unless deepspeed.scheduler.params.total_num_steps is given."
    )
    seed: int = param(
        56,
        help="Seed of the data order, masking, dropout and any random init (56: the default of "
        "Hugging Face's research_projects/distillation/train.py).",
    )
    log_interval: int = param(10, help="Steps between metrics.jsonl / TensorBoard / console lines (rank 0).")
    evaluate: bool = param(
        True,
        help="Evaluate the student on the shards' valid split (every eval_interval steps and at the end); the "
        "run refuses to start when that split is missing, unreadable or has fewer sequences than ranks. "
        "false = no evaluation (shards prepared without a valid split).",
    )
    eval_interval: int = param(500, help="Steps between evaluations on the valid split; 0 = only at the end.")
    eval_sequences: int = param(
        2048,
        help="Valid sequences per evaluation (the first ones of the split, shared out over the ranks); "
        "0 = the whole split.",
    )
    save_interval: int = param(500, help="Steps between checkpoints; 0 = only at the end and on SIGTERM / SIGUSR1.")
    keep_last: int = param(3, help="Checkpoints kept in checkpoints/ (older ones are deleted after a save).")
    max_bad_steps: int = param(
        25,
        help="Stop with an error after this many consecutive steps with a non-finite loss or gradient (skipped "
        "steps: fp16 loss-scale overflows included; the last checkpoint stays intact).",
    )
    allow_world_size_change: bool = param(
        False,
        help="Resume a checkpoint written with another number of ranks (a SLURM job requeued on fewer nodes). "
        "The data order continues at the nearest position of the new layout (up to one global micro-"
        "batch repeated or skipped); with ZeRO-1/2/3 the weights and the AdamW moments are re-sharded "
        "through DeepSpeed's universal checkpoint (docs/cluster.md, 'Changing the number of ranks').",
    )
    export_init: bool = param(
        True,
        help="Export the student before training to output_dir/student_init/ (for the evaluation report's "
        "before/after comparison); done once, on a fresh run.",
    )
    tensorboard: bool = param(True, help="Write TensorBoard scalars to output_dir/tensorboard/ (rank 0).")
    stages: list[StageConfig] | None = param(
        None,
        help='Two-step distillation: a list of stages, each {"steps": N, "name": ..., "loss": {alpha_...}} '
        "run in order on this run directory; a stage's loss keys replace the loss section's for its steps "
        "(TinyBERT: intermediate layers first, then the prediction layer). The steps must add up to "
        "max_steps. null = one stage with the loss section.",
    )
    compile: bool = param(
        False,
        help="torch.compile the student's and the teacher's encoders (in place: checkpoints and exports are "
        "unchanged) and the logit losses; about 40 s of compilation at the start. Recommended on GPU "
        "(H100, roberta-base -> 6 layers: 1.13x tokens/s); slower on CPU (docs/performance.md).",
    )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming ``train.<key>``."""
        check(bool(self.output_dir.strip()), "train.output_dir", "is empty; give a run directory")
        check(self.max_steps >= 1, "train.max_steps", f"{self.max_steps} must be >= 1")
        check(self.log_interval >= 1, "train.log_interval", f"{self.log_interval} must be >= 1")
        for key in ("eval_interval", "eval_sequences", "save_interval", "seed"):
            check(getattr(self, key) >= 0, f"train.{key}", f"{getattr(self, key)} must be >= 0")
        check(self.keep_last >= 1, "train.keep_last", f"{self.keep_last} must be >= 1 (the resume point)")
        check(self.max_bad_steps >= 1, "train.max_bad_steps", f"{self.max_bad_steps} must be >= 1")


@dataclasses.dataclass
class TaskConfig:
    """Task distillation (docs/task-distillation.md): a fine-tuned classifier teacher and labeled examples instead of
    shards. Without ``name`` the run is task-agnostic distillation on ``data.dir``."""

    name: str | None = param(
        None,
        help='The task: "glue:sst2" (any GLUE task, needs the hub), '
        '"embedded:rotten-tomatoes" (offline tasks of pretrain.tasks), "csv:PATH" or '
        '"jsonl:PATH"; null = task-agnostic distillation on data.dir.',
    )
    text_field: str = param("text", help="csv/jsonl tasks: the text field.")
    pair_field: str | None = param(None, help="csv/jsonl tasks: the second text field of pair tasks (null: none).")
    label_field: str = param("label", help="csv/jsonl tasks: the label field.")
    max_length: int = param(128, help="Tokens per example (longer ones are truncated).")
    split_seed: int = param(
        0,
        help="Seed of the deterministic train / dev / test split of embedded and local tasks "
        "(the one python -m pretrain.downstream uses by default).",
    )
    max_train_examples: int | None = param(None, help="Stratified cap on the train split (null = all).")
    max_eval_examples: int | None = param(1000, help="Stratified cap on each evaluation split (null = all).")
    eval_split: str = param(
        "dev",
        help='Split evaluated during training: "dev" (choose settings there; the test '
        'split is for the report) or "test".',
    )
    teacher_logits: Literal["on_the_fly", "precompute"] = param(
        "on_the_fly",
        help='"on_the_fly": the teacher runs every step; "precompute": its logits for every training '
        "example are computed once into RUN/teacher_logits.pt (verified by hash, reused), for "
        "losses that read only the logits (alpha_label, alpha_ce, alpha_prob_cos).",
    )
    student: str | None = param(
        None,
        help="Two-step distillation: a task-agnostic distilled encoder (a run's "
        "student/ directory) to start from instead of the teacher's layers; its "
        "depth must match student.layers (the layer pairs).",
    )
    head: Literal["teacher", "new"] = param(
        "teacher",
        help='With task.student: copy the teacher\'s classification head ("teacher", when the widths '
        'match) or start a new one ("new").',
    )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming ``task.<key>``."""
        check(self.max_length >= 8, "task.max_length", f"{self.max_length} must be >= 8")
        for key in ("max_train_examples", "max_eval_examples"):
            v = getattr(self, key)
            check(v is None or v >= 2, f"task.{key}", f"{v} must be >= 2 or null")
        check(self.eval_split in ("dev", "test"), "task.eval_split", f"{self.eval_split!r} is not 'dev' or 'test'")


def check_run_config(cfg: RunConfig) -> None:
    """Cross-section rules of task mode (``cfg``: RunConfig), or of task-agnostic mode when ``task.name`` is null.
    Raises :class:`ConfigError`."""
    task_mode = bool(cfg.task.name)
    for i, loss in enumerate(stage_losses(cfg)):
        where = "loss" if not cfg.train.stages else f"train.stages[{i}].loss"
        active = loss.active()
        if task_mode:
            check(
                "mlm" not in active,
                f"{where}.alpha_mlm",
                f"{loss.alpha_mlm}: task distillation has no masked tokens; set it to 0",
            )
        else:
            for term in TASK_TERMS:
                check(
                    term not in active,
                    f"{where}.alpha_{term}",
                    "is for task distillation (set task.name); set it to 0 for distillation on data.dir",
                )
        if task_mode and cfg.task.teacher_logits == "precompute":
            check(
                set(active) <= LOGIT_TERMS,
                "task.teacher_logits",
                f"'precompute' needs a loss on the logits only ({', '.join('alpha_' + t for t in sorted(LOGIT_TERMS))}"
                f"); {where} also has {sorted(set(active) - LOGIT_TERMS)}, for which the teacher runs anyway: use "
                f"'on_the_fly'",
            )
    if task_mode:
        check(
            cfg.student.architecture == "same",
            "student.architecture",
            f"{cfg.student.architecture!r}: task distillation keeps the teacher's class ('same')",
        )
        check(
            cfg.student.init != "prune",
            "student.init",
            "'prune' measures importance on data.dir's shards, which task distillation does not read; prune in a "
            "task-agnostic run and give its student/ as task.student, or use 'teacher' or 'random'",
        )
    else:
        check(
            bool(cfg.data.dir.strip()),
            "data.dir",
            "is empty; give the shard directory of `python -m data_prep "
            "prepare` (or set task.name for task distillation)",
        )


SECTIONS: dict[str, type] = {
    "teacher": TeacherConfig,
    "student": StudentConfig,
    "data": DataConfig,
    "masking": MaskingConfig,
    "loss": LossConfig,
    "train": TrainConfig,
    "task": TaskConfig,
}
REQUIRED_SECTIONS = ("teacher", "train")


@dataclasses.dataclass
class RunConfig:
    """A whole run: every section, validated; ``deepspeed`` is the raw DeepSpeed dict (:mod:`pretrain.ds_config`)."""

    teacher: TeacherConfig
    student: StudentConfig
    data: DataConfig
    masking: MaskingConfig
    loss: LossConfig
    train: TrainConfig
    task: TaskConfig
    deepspeed: dict
    comment: Any = None

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (the resolved config written to the run directory)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["deepspeed"] = json.loads(json.dumps(self.deepspeed))
        if self.comment is not None:
            out = {"comment": self.comment, **out}
        return out

    def validate(self) -> None:
        """Cross-section rules (each section validated itself already). Raises :class:`ConfigError`."""
        from pretrain import ds_config

        stage_losses(self)  # each stage's loss weights valid, the steps add up
        check_run_config(self)  # task mode or shards: the terms and keys each needs
        ds_config.check_static(self.deepspeed, self.train.max_steps)
        if self.loss.alpha_ce > 0 or self.loss.alpha_mlm > 0:
            check(
                self.masking.mlm_mask_prop > 0,
                "masking.mlm_mask_prop",
                "must be > 0 when loss.alpha_ce or loss.alpha_mlm is on",
            )


def from_dict(raw: dict, where: str = "config") -> RunConfig:
    """Build and validate a :class:`RunConfig` from a raw dict; ``where`` (the file name) prefixes every error."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object with sections {[*list(SECTIONS), 'deepspeed']}")
    valid = [*list(SECTIONS), "deepspeed", *list(COMMENT_KEYS)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; valid top-level keys are {valid}")
    missing = [s for s in REQUIRED_SECTIONS if s not in raw]
    if missing:
        raise ConfigError(f"{where}: required section(s) {missing} missing")
    try:
        sections = {}
        for name, cls in SECTIONS.items():
            value = raw.get(name, {})
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected an object, got {value!r}")
            sections[name] = schema.from_dict(cls, value, name)
        ds = raw.get("deepspeed", {})
        if not isinstance(ds, dict):
            raise ConfigError(f"deepspeed: expected an object (a DeepSpeed config), got {ds!r}")
        comment = next((raw[k] for k in COMMENT_KEYS if k in raw), None)
        cfg = RunConfig(**sections, deepspeed=dict(ds), comment=comment)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config JSON file, apply ``section.key=value`` overrides, validate.

    Raises :class:`ConfigError` naming the file for a missing file, invalid JSON (line and column), an unknown
    section or key, a wrong type or an out-of-range value.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not overrides:
        return from_dict(raw, str(path))
    try:
        return from_dict(schema.apply_overrides(raw, list(overrides)), str(path))
    except ConfigError as e:
        raise ConfigError(_blame(raw, list(overrides), path, e)) from None


def _blame(raw: dict, overrides: list[str], path: Path, error: ConfigError) -> str:
    """The message of ``error`` (raised by the file with ``overrides``) prefixed by who is at fault: the first
    override after which the config stops validating, else the file itself."""
    message = str(error).removeprefix(f"{path}: ")
    for k in range(len(overrides) + 1):
        try:
            from_dict(schema.apply_overrides(raw, overrides[:k]), str(path))
        except ConfigError as e:
            if str(e).removeprefix(f"{path}: ") == message:
                return f"{path}: {message}" if k == 0 else f"{path}: override {overrides[k - 1]!r}: {message}"
    return f"{path}: overrides {overrides}: {message}"


DEEPSPEED_ROWS = [
    (
        "`train_batch_size`, `train_micro_batch_size_per_gpu`, `gradient_accumulation_steps`",
        "give any two (or the first alone, or all three); the third follows from train_batch_size = micro x "
        "accumulation x world size. A combination that cannot hold is an error naming the numbers.",
    ),
    (
        "`optimizer`",
        "`AdamW`, lr 5e-4, betas [0.9, 0.98], eps 1e-6, weight decay 0.0 (DistilBERT); on CPU `torch_adam: "
        "true` (no compiled op) with `fused: true` (PyTorch's fused AdamW).",
    ),
    (
        "`scheduler`",
        "`WarmupDecayLR` (linear warm-up, then linear decay to 0): `total_num_steps` = train.max_steps, "
        "`warmup_num_steps` = 5% of it, at least 1 (DistilBERT's warmup_prop 0.05), `warmup_max_lr` = the "
        "optimizer's lr, `warmup_type` linear.",
    ),
    (
        "`gradient_clipping`",
        "5.0 (DistilBERT's max_grad_norm).",
    ),
    (
        "`optimizer.params`, `scheduler.params`",
        "checked when the config is loaded: lr > 0, betas in [0, 1), eps >= 0, weight_decay >= 0, 1 <= "
        "warmup_num_steps <= total_num_steps, warmup_min_lr >= 0, warmup_max_lr > 0 (finite numbers; JSON's NaN"
        " is refused).",
    ),
    (
        "`fp16` / `bf16`",
        "off (fp32) unless enabled; fp16 uses dynamic loss scaling (`loss_scale: 0`). fp16 needs a GPU.",
    ),
    (
        "`zero_optimization.stage`",
        "0; stages 0-3 are supported.",
    ),
    (
        "`steps_per_print`",
        "effectively off: the trainer logs itself.",
    ),
    (
        "every key",
        "checked against the installed DeepSpeed's own schema when the config is loaded (`pretrain.ds_schema`):"
        " a top-level key DeepSpeed does not read, or a key unknown to the pydantic model of "
        '`zero_optimization`, `bf16`, `fp16`, `compile` or a monitor section, is an error with a "did you '
        'mean"; DeepSpeed itself would ignore it.',
    ),
]

DEEPSPEED_REFERENCE = (
    "### `deepspeed`\n\n"
    "An ordinary DeepSpeed config (https://www.deepspeed.ai/docs/config-json/), passed to `deepspeed.initialize`.\n"
    "`pretrain.ds_config` fills in what the section leaves out, once the world size is known:\n\n"
    + "| key | derived / default |\n| --- | --- |\n"
    + "".join(f"| {key} | {text} |\n" for key, text in DEEPSPEED_ROWS)
)


def reference_markdown() -> str:
    """The configuration reference (markdown) of every section, from the dataclasses' field docs."""
    top = (
        "Top-level keys: the sections below, and an optional `comment` (or `_source`): free text (string or list "
        "of strings) naming the source of the hyperparameters; it is kept in the resolved config and otherwise "
        "ignored.\n\n"
    )
    return top + schema.reference_markdown(SECTIONS) + "\n" + DEEPSPEED_REFERENCE


def main(argv: list[str] | None = None) -> int:
    """``python -m pretrain.config --reference`` | ``python -m pretrain.config CONFIG [section.key=value ...]``."""
    p = argparse.ArgumentParser(
        prog=prog("python -m pretrain.config"), description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--reference", action="store_true", help="print the markdown configuration reference")
    p.add_argument("config", nargs="?", help="a run config to validate; prints the resolved config")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (values parsed as JSON when they parse)")
    p.add_argument(
        "--world-size", type=int, default=1, help="data-parallel ranks to derive the batch plan for (default: 1)"
    )
    p.add_argument("--quiet", action="store_true", help="print only errors and warnings, not the resolved config")
    args = p.parse_intermixed_args(argv)
    if args.reference:
        print(reference_markdown())
        return 0
    if not args.config:
        p.error("give --reference or a config file")
    from pretrain import config_plan

    try:
        cfg = load(args.config, args.overrides)
        plan, warnings = config_plan.check_and_plan(cfg, args.world_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not args.quiet:
        print(json.dumps(cfg.to_dict(), indent=2))
    for line in plan:
        print(f"plan: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
