"""Mutation score per module from mutmut's result files (``mutants/**/*.py.meta``), for ``make mutation``.

Prints one line per mutated module (killed / total = score, survivors, timeouts, mutants no selected test reaches) and
the numerical core's total (every module but pretrain/checkpoint.py and pretrain/prune.py, docs/testing.md "Mutation
testing"), then every mutant not killed with why (survived; no tests: no selected test reaches it; not run)
(``mutmut show NAME`` prints a mutant's diff). A timeout counts as
killed (the mutant made a test hang), as mutmut counts it. Exit status 0 always: the score is a report, not a gate.

Usage: ``python scripts/mutation_score.py [mutants]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NOT_CORE = ("pretrain/checkpoint.py", "pretrain/prune.py")
KILLED = {1, 3, 36, 24, -24, 152, 255, 37}  # mutmut's stats.status_by_exit_code: killed, timeout, type check
SURVIVED = {0}
NO_TESTS = {33, 5}


def module_results(root: Path) -> dict[str, dict[str, int | None]]:
    """``{"pretrain/masking.py": {mutant name: exit code or None (not run)}}`` from the ``.meta`` files under root."""
    out = {}
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        out[str(meta.relative_to(root))[: -len(".meta")]] = codes
    return out


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "mutants")
    results = module_results(root)
    if not results:
        print(f"no mutmut results under {root}/ (run make mutation first)")
        return 0
    core = [0, 0]
    survivors = []
    print(f"{'module':28} {'killed':>6} {'total':>6} {'score':>7} {'survived':>8} {'no tests':>8} {'not run':>7}")
    for module, codes in results.items():
        run = [c for c in codes.values() if c is not None]
        killed = sum(c in KILLED for c in run)
        survived = [k for k, c in codes.items() if c in SURVIVED]
        untested = [k for k, c in codes.items() if c in NO_TESTS]
        unrun = [k for k, c in codes.items() if c is None]
        total = len(codes)
        survivors += [(k, "survived") for k in survived] + [(k, "no tests") for k in untested]
        if run:  # a module left out of this run (MUTATION_MODULES) is one line of "not run" above, not a list
            survivors += [(k, "not run") for k in unrun]
        if module not in NOT_CORE:
            core[0] += killed
            core[1] += total
        score = f"{100 * killed / total:.1f}%" if total else "-"
        print(f"{module:28} {killed:6d} {total:6d} {score:>7} {len(survived):8d} {len(untested):8d} {len(unrun):7d}")
    if core[1]:
        print(
            f"numerical core: {core[0]} / {core[1]} killed = {100 * core[0] / core[1]:.1f}%"
            " (a mutant not run counts as not killed)"
        )
    print("mutants not killed:" if survivors else "every mutant killed")
    for name, why in survivors:
        print(f"  {name}  ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
