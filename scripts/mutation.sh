#!/usr/bin/env bash
# make mutation: mutmut over the numerical core, one module at a time (docs/testing.md "Mutation testing").
# mutmut copies pretrain/ and data_prep/ to mutants/ (git-ignored), runs the fast tests of [tool.mutmut] in
# pyproject.toml once to record which tests reach each function, then for each mutant runs only those tests (-x).
# Usage: scripts/mutation.sh [VENV_BIN] [MODULE...]   (MODULE as pretrain.masking; default: every module below)
# MUTATION_JOBS: parallel mutant workers (default 2).
set -euo pipefail
BIN=${1:-.venv/bin}
shift || true
MODULES=("$@")
if [ ${#MODULES[@]} -eq 0 ]; then
    MODULES=(pretrain.masking pretrain.losses pretrain.validate pretrain.distill pretrain.data data_prep.shards
        pretrain.student pretrain.prune pretrain.checkpoint)
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for module in "${MODULES[@]}"; do
    start=$(date +%s)
    # mutmut redraws its progress line many times a second: keep only the last state of each line
    "$BIN/mutmut" run --max-children "${MUTATION_JOBS:-2}" "$module.*" | tr '\r' '\n' | grep -v '^ *$' | tail -n 3
    echo "$module: $(($(date +%s) - start)) s"
done
"$BIN/python" scripts/mutation_score.py mutants
