#!/usr/bin/env bash
# make mutation: mutmut over the numerical core and the pruning / checkpoint code (docs/testing.md "Mutation testing").
# mutmut copies pretrain/ and data_prep/ to mutants/ (git-ignored), runs the fast tests of [tool.mutmut] in
# pyproject.toml once to record which tests reach each function, then for each mutant runs only those tests (-x),
# narrowed to the mutated module's own test files by tests/mutation_scope.py. One mutmut run for all the modules: it
# generates the mutants and records the tests once.
# Usage: scripts/mutation.sh [VENV_BIN] [MODULE...]   (MODULE as pretrain.masking; default: every module below)
# MUTATION_JOBS: parallel mutant workers (default 2, one per core of the reference machine).
set -euo pipefail
BIN=${1:-.venv/bin}
shift || true
MODULES=("$@")
if [ ${#MODULES[@]} -eq 0 ]; then
    MODULES=(pretrain.masking pretrain.losses pretrain.validate pretrain.distill pretrain.data data_prep.shards
        pretrain.student pretrain.prune pretrain.checkpoint)
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
start=$(date +%s)
# mutmut redraws its progress line many times a second and lists every mutant: keep its rate line
"$BIN/mutmut" run --max-children "${MUTATION_JOBS:-2}" "${MODULES[@]/%/.*}" | tr '\r' '\n' | grep -a 'mutations/second'
echo "mutmut: $(($(date +%s) - start)) s for ${MODULES[*]}"
"$BIN/python" scripts/mutation_score.py mutants
