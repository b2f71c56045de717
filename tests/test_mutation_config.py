"""``make mutation``'s configuration stays consistent with the code it mutates (docs/testing.md "Mutation testing").

mutmut runs for hours, so a renamed test file or module would only show at the end of a run (pytest exit 4 or 5 for
every mutant: "no tests", counted as not killed). These checks read ``[tool.mutmut]`` in pyproject.toml,
``tests/mutation_scope.py``, ``scripts/mutation.sh`` and ``scripts/mutation_score.py`` and compare them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests import mutation_scope

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib

    def _loads(text: str) -> dict:
        return tomllib.loads(text)
else:  # mutmut needs the `toml` package on Python 3.10 and reads its configuration with it
    import toml

    def _loads(text: str) -> dict:
        return toml.loads(text)


@pytest.fixture(scope="module")
def mutmut_config() -> dict:
    return _loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mutmut"]


def _module(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def test_every_mutated_module_has_a_scope_and_is_run_by_the_script(mutmut_config):
    mutated = [_module(p) for p in mutmut_config["only_mutate"]]
    for path in mutmut_config["only_mutate"]:
        assert (ROOT / path).is_file(), path
    assert sorted(mutation_scope.TESTS) == sorted(mutated)
    script = (ROOT / "scripts" / "mutation.sh").read_text(encoding="utf-8")
    default = re.search(r"MODULES=\(([^)]*)\)\n", script.split("if [ ${#MODULES[@]} -eq 0 ]")[1])
    assert default is not None, "scripts/mutation.sh lost its default module list"
    assert sorted(default.group(1).split()) == sorted(mutated)


def test_every_scoped_test_file_exists_and_is_in_mutmuts_selection(mutmut_config):
    selection = mutmut_config["pytest_add_cli_args_test_selection"]
    for path in selection:
        assert (ROOT / path).is_file(), f"[tool.mutmut] selects {path}, which does not exist"
    selected = {Path(p).name for p in selection}
    for module, files in mutation_scope.TESTS.items():
        own = f"test_mutants_{module.rsplit('.', 1)[1]}.py"
        assert files[0] == own, f"{module}: its own kill tests ({own}) run first"
        missing = [f for f in files if f not in selected]
        # a file in a scope but outside the selection is never recorded by mutmut's stats run: its tests never run
        assert not missing, f"{module}: {missing} not in pytest_add_cli_args_test_selection"


def test_every_deselected_test_exists(mutmut_config):
    args = mutmut_config["pytest_add_cli_args"]
    nodes = [args[i + 1] for i, a in enumerate(args) if a == "--deselect"]
    assert nodes
    for node in nodes:
        path, name = node.split("::")
        text = (ROOT / path).read_text(encoding="utf-8")
        assert re.search(rf"^def {re.escape(name)}\(", text, re.M), f"--deselect {node}: no such test"


def test_scope_maps_mutant_names_to_their_modules_files():
    assert mutation_scope.scope("pretrain.masking.xǁMaskerǁ_mask__mutmut_3") == mutation_scope.TESTS["pretrain.masking"]
    assert mutation_scope.scope("data_prep.shards.x_verify__mutmut_80") == mutation_scope.TESTS["data_prep.shards"]
    # a module whose name starts like another's is not taken for it
    assert mutation_scope.scope("pretrain.datasets.x_f__mutmut_1") is None
    for run in ("", "stats", "fail", "list_all_tests", "mutant_generation"):
        assert mutation_scope.scope(run) is None


def test_the_score_counts_the_numerical_core_as_the_issue_defines_it(mutmut_config):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import mutation_score
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    core = sorted(set(mutmut_config["only_mutate"]) - set(mutation_score.NOT_CORE))
    assert core == sorted(
        [
            "data_prep/shards.py",
            "pretrain/data.py",
            "pretrain/distill.py",
            "pretrain/losses.py",
            "pretrain/masking.py",
            "pretrain/student.py",
            "pretrain/validate.py",
        ]
    )
    assert set(mutation_score.NOT_CORE) <= set(mutmut_config["only_mutate"])
