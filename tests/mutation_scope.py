"""pytest plugin for ``make mutation`` (loaded with ``-p tests.mutation_scope`` from pyproject.toml's [tool.mutmut]):
each mutated module is tested by its own fast tests only (docs/testing.md "Mutation testing").

mutmut runs, for a mutant, every selected test that reached the mutated function when it recorded coverage; through
the pipeline that is most of the suite for a function like ``Masker.__call__``. While mutmut tests a mutant
(``MUTANT_UNDER_TEST`` names it) this plugin keeps only the test files of :data:`TESTS` for the mutant's module, in
that order (the module's own tests first), so that a mutant costs about the time of its module's tests. Outside
mutmut (no such variable, or mutmut's own runs: stats, forced fail) it changes nothing.
"""

from __future__ import annotations

import os

TESTS = {
    "pretrain.masking": ["test_mutants_masking.py", "test_masking.py"],
    "pretrain.losses": ["test_mutants_losses.py", "test_losses.py", "test_distill.py"],
    "pretrain.distill": ["test_mutants_distill.py", "test_distill.py", "test_prune.py"],
    "pretrain.student": [
        "test_mutants_student.py",
        "test_mutants_student_build.py",
        "test_student.py",
        "test_distill.py",
        "test_prune.py",
    ],
    "pretrain.prune": ["test_mutants_prune.py", "test_prune.py"],
    "pretrain.data": ["test_mutants_data.py", "test_train_data.py", "test_integrity.py"],
    "pretrain.validate": ["test_mutants_validate.py", "test_train_parts.py"],
    "pretrain.checkpoint": ["test_mutants_checkpoint.py", "test_train_data.py"],
    "data_prep.shards": ["test_mutants_shards.py", "test_train_data.py", "test_integrity.py"],
}
MUTMUT_RUNS = {"", "stats", "fail", "list_all_tests", "mutant_generation"}
# imported once in mutmut's fork server, before it forks a process per mutant: otherwise every mutant's process pays
# transformers' lazy model imports (seconds each on 2 busy cores)
PRELOAD = (
    "transformers.models.bert.modeling_bert",
    "transformers.models.roberta.modeling_roberta",
    "transformers.models.distilbert.modeling_distilbert",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.tokenization_utils_tokenizers",
    "tokenizers",
    "pretrain.config",
    "pretrain.distill",
    "pretrain.prune",
    "pretrain.validate",
    "pretrain.data",
    "pretrain.checkpoint",
    "data_prep.shards",
    "tests.tiny",
)


_preloaded = False


def pytest_configure(config):
    global _preloaded
    if _preloaded:  # once per fork server: the processes it forks inherit the flag
        return
    _preloaded = True
    import contextlib
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # a renamed transformers module: only slower
            importlib.import_module(name)
    from tests import tiny

    tiny.bert_model(tiny.bert_tokenizer(), layers=1)  # the rest of the lazy imports a tiny model's first use pulls


def scope(mutant: str) -> list[str] | None:
    """The test files for a mutant name like ``pretrain.masking.xǁMaskerǁ_mask__mutmut_3`` (None: not scoped)."""
    if mutant in MUTMUT_RUNS:
        return None
    for module, files in TESTS.items():
        if mutant.startswith(module + "."):
            return files
    return None


def pytest_collection_modifyitems(config, items):
    files = scope(os.environ.get("MUTANT_UNDER_TEST", ""))
    if files is None:
        return
    rank = {name: i for i, name in enumerate(files)}
    keep = [item for item in items if item.path.name in rank]
    drop = [item for item in items if item.path.name not in rank]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = sorted(keep, key=lambda item: rank[item.path.name])  # stable: file order kept within a file
