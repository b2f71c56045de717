#!/usr/bin/env bash
# The CUDA tests (pytest marker `gpu`: tests/test_gpu.py) on a GPU machine, where the CPU suite deselects them.
#
#   scripts/gpu_tests.sh [PYTEST_ARGS ...]
#
# Uses the machine's own CUDA build of torch (PYTHON, default python3). Where DeepSpeed is not installed and the
# machine has no package index, GPU_WHEELS=DIR names a folder of wheels (DeepSpeed and the pure-Python packages it
# needs) that are unpacked into .site/ and put on PYTHONPATH, leaving the machine's packages alone. Prints the
# versions and the GPU, then runs `pytest -m gpu`; its exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
if [[ -n ${GPU_WHEELS:-} ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target .site "$GPU_WHEELS"/*.whl
  export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'PYEOF'
import sys
import torch, transformers, deepspeed, tokenizers
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "deepspeed", deepspeed.__version__, "tokenizers", tokenizers.__version__)
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: the gpu tests need one")
PYEOF
exec "$PY" -m pytest tests -m gpu -p no:cacheprovider -v -rfE "$@"
