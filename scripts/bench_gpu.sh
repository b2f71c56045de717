#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one script: fast versus naive distillation step (roberta-base
# dimensions -> 6 layers, 512 tokens), fp16 and bf16, a micro-batch sweep, ablations, torch.compile, and a short fp16
# ZeRO-2 training job end to end (real text, a real teacher, evaluation, checkpoints, resume, export).
#
#   scripts/bench_gpu.sh OUTDIR [STAGE ...]        stages: smoke e2e fp16 bf16 ablate profile compile (default: all)
#
# Each benchmark writes OUTDIR/<name>.jsonl (the JSON lines of python -m pretrain.bench) and <name>.log; a stage
# that fails (for example CUDA out of memory at a large micro-batch) is recorded and the script goes on, except
# `smoke`, which stops it. The last thing printed is a table of every result in OUTDIR.
# Environment: PYTHON (python3), BENCH_CONFIG (configs/bench-gpu-roberta-base.json), BENCH_TIMEOUT (seconds per
# benchmark, 420); micro-batches: MICRO_FAST ("128 256"), MICRO_NAIVE ("32 64 128"), MICRO_BOTH (32), MICRO_ABLATE
# (64), MICRO_PROFILE (128), MICRO_COMPILE (128), COMPILE_PRECISION (fp16; "fp16 bf16": both); an empty
# MICRO_FAST / MICRO_NAIVE / MICRO_BOTH skips those runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/bench_gpu.sh OUTDIR [smoke e2e fp16 bf16 ablate profile compile]}
shift
STAGES=${*:-smoke e2e fp16 bf16 ablate profile compile}
PY=${PYTHON:-python3}
CFG=${BENCH_CONFIG:-configs/bench-gpu-roberta-base.json}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
mkdir -p "$OUT"
T0=$SECONDS

precision() {  # precision fp16|bf16: PREC = the overrides for it (the config is fp16)
  PREC=()
  if [[ $1 == bf16 ]]; then PREC=(deepspeed.fp16.enabled=false deepspeed.bf16.enabled=true); fi
}

bench() {  # bench NAME ARGS...: one python -m pretrain.bench run
  local name=$1; shift
  printf '[bench_gpu %4ds] %s: %s\n' $((SECONDS - T0)) "$name" "$*"
  if timeout "${BENCH_TIMEOUT:-420}" "$PY" -m pretrain.bench --config "$CFG" "$@" \
      >"$OUT/$name.jsonl" 2>"$OUT/$name.log"; then
    return 0
  fi
  echo "[bench_gpu] $name FAILED: $(grep -E 'Error|error' "$OUT/$name.log" | tail -n 2)"
  return 1
}

for stage in $STAGES; do
  case $stage in
    smoke)  # both modes, small micro-batch: does the GPU path run at all (also builds DeepSpeed's fused Adam)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      "$PY" -c 'import torch, transformers, deepspeed as ds
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "deepspeed", ds.__version__)'
      bench smoke-fp16 --both --steps 2 --warmup 1 deepspeed.train_micro_batch_size_per_gpu=8 \
        || { tail -n 30 "$OUT/smoke-fp16.log"; exit 1; } ;;
    e2e)  # a short real training job: fp16, ZeRO-2, 2 micro-batches per step, evaluation, checkpoints, resume
      run=runs/gpu-e2e
      rm -rf "$run"
      set -x
      "$PY" -m data_prep prepare --source embedded --tokenizer embedded:bert-tiny-mlm --max-seq-length 128 \
        --valid-fraction 0.1 --output runs/data/bert-tiny-mlm-128 >"$OUT/e2e-prepare.log" 2>&1 \
      && "$PY" -m deepspeed.launcher.runner --num_gpus 1 launch/pretrain.py --config configs/embedded-mlm.json \
        deepspeed.fp16.enabled=true deepspeed.zero_optimization.stage=2 train.max_steps=200 \
        train.save_interval=100 train.eval_interval=100 train.log_interval=20 train.output_dir=$run \
        >"$OUT/e2e-train.log" 2>&1 \
      && "$PY" -m deepspeed.launcher.runner --num_gpus 1 launch/pretrain.py --config configs/embedded-mlm.json \
        deepspeed.fp16.enabled=true deepspeed.zero_optimization.stage=2 train.max_steps=300 \
        train.save_interval=100 train.eval_interval=100 train.log_interval=20 train.output_dir=$run \
        >"$OUT/e2e-resume.log" 2>&1
      rc=$?
      set +x
      grep -hE '^\[pretrain\]' "$OUT"/e2e-train.log "$OUT"/e2e-resume.log | tail -n 40
      cp "$run/metrics.jsonl" "$OUT/e2e-metrics.jsonl" 2>/dev/null
      ls "$run" "$run/student" 2>&1 | tr '\n' ' '; echo
      [[ $rc == 0 ]] || { echo "[bench_gpu] e2e FAILED (rc $rc)"; tail -n 40 "$OUT"/e2e-*.log; } ;;
    fp16|bf16)  # the largest micro-batch: fast and naive separately, then both interleaved at one size
      precision "$stage"
      for m in ${MICRO_FAST-128 256}; do
        bench "$stage-fast-mb$m" --steps 5 --warmup 2 deepspeed.train_micro_batch_size_per_gpu="$m" "${PREC[@]}"
      done
      for m in ${MICRO_NAIVE-32 64 128}; do
        bench "$stage-naive-mb$m" --naive --steps 5 --warmup 2 deepspeed.train_micro_batch_size_per_gpu="$m" \
          "${PREC[@]}"
      done
      [[ -z ${MICRO_BOTH-32} ]] || bench "$stage-both-mb${MICRO_BOTH:-32}" --both --steps 5 --warmup 2 \
        deepspeed.train_micro_batch_size_per_gpu="${MICRO_BOTH:-32}" "${PREC[@]}" ;;
    ablate)  # each optimisation of the fast step undone, interleaved with it; and the student's dropout priced
      bench "fp16-ablate-mb${MICRO_ABLATE:-64}" --steps 5 --warmup 2 \
        deepspeed.train_micro_batch_size_per_gpu="${MICRO_ABLATE:-64}" \
        --ablate head --ablate attention --ablate teacher-fp32 --ablate host-sync --ablate vocab-align \
        --ablate dropout ;;
    profile)  # the operator table of one fast step (torch.profiler), sorted by GPU time
      m=${MICRO_PROFILE:-128}
      bench "fp16-profile-mb$m" --steps 2 --warmup 2 --profile "$OUT/profile-fast-mb$m.txt" \
        deepspeed.train_micro_batch_size_per_gpu="$m" && head -n 45 "$OUT/profile-fast-mb$m.txt" | cut -c1-150 ;;
    compile)
      for prec in ${COMPILE_PRECISION-fp16}; do
        for m in ${MICRO_COMPILE-128}; do
          precision "$prec"
          bench "$prec-compile-mb$m" --steps 5 --warmup 2 train.compile=true \
            deepspeed.train_micro_batch_size_per_gpu="$m" "${PREC[@]}"
        done
      done ;;
    *) echo "unknown stage $stage (smoke e2e fp16 bf16 ablate profile compile)"; exit 2 ;;
  esac
done

# the table: one row per mode of every benchmark run in OUTDIR
"$PY" - "$OUT" <<'EOF'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.jsonl"))):
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("benchmark") == "distill_train_step" and r.get("mode") != "comparison":
            rows.append((os.path.basename(path)[:-6], r))
print(f"{'run':<22} {'mode':<22} {'prec':<5} {'micro':>5} {'step_s':>7} {'tokens/s':>10} {'TFLOP/s':>8} "
      f"{'MFU':>6} {'mem GiB':>8} {'skip':>4}")
for name, r in rows:
    print(f"{name:<22} {r['mode']:<22} {r['precision']:<5} {r['config']['micro_batch']:>5} {r['step_s']:>7.3f} "
          f"{r['tokens_per_s']:>10,.0f} {r['achieved_flops_per_s'] / 1e12:>8.1f} {r['mfu'] or 0:>6.3f} "
          f"{r['peak_memory_mib'] / 1024:>8.1f} {r['skipped_steps']:>4}")
EOF
echo "[bench_gpu] done in $((SECONDS - T0)) s"
