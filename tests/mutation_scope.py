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
    "pretrain.student": ["test_mutants_student.py", "test_student.py", "test_distill.py", "test_prune.py"],
    "pretrain.prune": ["test_mutants_prune.py", "test_prune.py"],
    "pretrain.data": ["test_mutants_data.py", "test_train_data.py", "test_integrity.py"],
    "pretrain.validate": ["test_mutants_validate.py", "test_train_parts.py"],
    "pretrain.checkpoint": ["test_mutants_checkpoint.py", "test_train_data.py"],
    "data_prep.shards": ["test_mutants_shards.py", "test_train_data.py", "test_integrity.py"],
}
MUTMUT_RUNS = {"", "stats", "fail", "list_all_tests", "mutant_generation"}


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
