#!/usr/bin/env bash
# Check which named mutants a test file kills, without a whole mutmut run (docs/testing.md "Mutation testing").
# Needs mutants/ from a `make mutation` run (or any `mutmut run`): copies the test files into mutants/tests/, runs them
# once unmutated (they must pass), then once per mutant the way mutmut does (MUTANT_UNDER_TEST, the per-module scope
# of tests/mutation_scope.py, -x), and prints KILLED (pytest exit 1), SURVIVED (exit 0) or OTHER rc=N (5: every test
# deselected, the file is not in the module's scope in tests/mutation_scope.py).
# Usage: scripts/mutant_check.sh TEST_FILE[,TEST_FILE...] MUTANT_NAME...   or   ... -f FILE_OF_NAMES (first column)
# VENV_BIN: the environment's bin directory (default .venv/bin); MUTANTS: mutmut's directory (default mutants).
set -uo pipefail
if [ $# -lt 2 ]; then
    sed -n '2,8p' "$0"
    exit 2
fi
TESTS=$1
shift
if [ "$1" = "-f" ]; then mapfile -t NAMES < <(awk '{print $1}' "$2"); else NAMES=("$@"); fi
PY=$(realpath "${VENV_BIN:-.venv/bin}")/python
MUTANTS=${MUTANTS:-mutants}
if [ ! -d "$MUTANTS/tests" ]; then
    echo "no $MUTANTS/tests: run make mutation (or mutmut run) first" >&2
    exit 2
fi
FILES=()
IFS=, read -ra GIVEN <<<"$TESTS"
for t in "${GIVEN[@]}"; do
    cp "$t" "$MUTANTS/tests/" || exit 2
    FILES+=("tests/$(basename "$t")")
done
cd "$MUTANTS" || exit 2
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
ARGS=(-x -q -p no:cacheprovider -p tests.mutation_scope -m "not slow and not slurm" "${FILES[@]}")
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
if ! MUTANT_UNDER_TEST="" "$PY" -m pytest "${ARGS[@]}" >"$LOG" 2>&1; then
    echo "the test files fail without a mutant: fix them first" >&2
    tail -n 30 "$LOG" >&2
    exit 1
fi
for m in "${NAMES[@]}"; do
    MUTANT_UNDER_TEST=$m "$PY" -m pytest "${ARGS[@]}" >"$LOG" 2>&1
    rc=$?
    case $rc in
    0) echo "SURVIVED $m" ;;
    1) echo "KILLED   $m  ($(grep -m1 -o 'FAILED [^ ]*' "$LOG" | cut -c8-))" ;;
    *) echo "OTHER rc=$rc $m" ;;
    esac
done
