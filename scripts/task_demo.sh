#!/usr/bin/env bash
# Task distillation on the embedded default (`make task-demo`; docs/task-distillation.md has the table it makes).
#
#   scripts/task_demo.sh [PYTHON]          (PYTHON also from $PYTHON; default python3)
#
# 1. teacher  all-MiniLM-L6-v2 fine-tuned on embedded:rotten-tomatoes (python -m pretrain.downstream --save-model)
# 2. baselines fine-tuned directly, $SEEDS seeds: the 3-layer student (teacher layers 0, 2, 4 of the sentence encoder)
#    and the top-layer truncation (its first 3 layers), with the teacher's protocol
# 3. task distillation from the fine-tuned teacher, $SEEDS seeds each (configs/task-demo.json):
#    kd          the teacher's layers 0, 2, 4 and its head, KL on the class distributions
#    two-step    the demo's task-agnostic student (runs/demo/student, `make demo`), then the same task distillation
#    distillator the Distillator loss as written: label CE + soft CE + probability cosine, averaged, T = 1
# 4. every model scored on the test split as it is (python -m pretrain.taskmode evaluate); the table -> $OUT/table.md
#
# Every step reuses what a previous run finished. Environment: SEEDS (3), TRAIN (2000 examples), OUT (runs/task).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ $# -gt 0 ]]; then PY=$1; shift; fi
SEEDS=${SEEDS:-3}
TRAIN=${TRAIN:-2000}
OUT=${OUT:-runs/task}
TASK=embedded:rotten-tomatoes
TEACHER=$OUT/ft/teacher/embedded_rotten-tomatoes
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
say() { printf '\n[task-demo] %s\n' "$*"; }
mkdir -p "$OUT"
T0=$SECONDS

say "1/4 teacher: all-MiniLM-L6-v2 fine-tuned on $TASK ($TRAIN examples, 3 epochs) -> $TEACHER"
if [[ ! -f $TEACHER/config.json ]]; then
  "$PY" -m pretrain.downstream --task "$TASK" --model teacher=embedded:minilm-l6 --seeds 1 --save-model "$OUT/ft" \
    --output "$OUT/teacher-ft" --max-train "$TRAIN" --epochs 3 --no-plot
fi

say "2/4 baselines fine-tuned directly ($SEEDS seeds): layers 0,2,4 and the top-layer truncation"
if [[ ! -f $OUT/baselines/downstream.json ]]; then
  "$PY" - "$OUT/models" <<'EOF_PY'
import sys
from pathlib import Path
from data_prep.embedded import resolve_model
from pretrain.downstream import build_truncation_baseline
from transformers import AutoModel, AutoTokenizer
from pretrain.student import StudentConfig, build_student
out = Path(sys.argv[1])
teacher = resolve_model("embedded:minilm-l6")
if not (out / "layers024" / "config.json").is_file():
    student, _ = build_student(AutoModel.from_pretrained(teacher), StudentConfig(layers=[0, 2, 4]))
    student.save_pretrained(out / "layers024")
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out / "layers024")
if not (out / "truncation" / "config.json").is_file():
    build_truncation_baseline(teacher, 3, out / "truncation")
EOF_PY
  "$PY" -m pretrain.downstream --task "$TASK" --model "layers024=$OUT/models/layers024" \
    --model "truncation=$OUT/models/truncation" --seeds "$SEEDS" --save-model "$OUT/baselines/models" \
    --output "$OUT/baselines" --max-train "$TRAIN" --epochs 3 --no-plot
fi

say "3/4 task distillation ($SEEDS seeds each; configs/task-demo.json)"
run() {  # name seed overrides...
  local name=$1 seed=$2; shift 2
  local dir=$OUT/$name-$seed
  [[ -f $dir/student/config.json ]] && return 0
  local t=$SECONDS
  "$PY" launch/pretrain.py --config configs/task-demo.json "teacher.name_or_path=$TEACHER" \
    "task.max_train_examples=$TRAIN" "train.output_dir=$dir" "train.seed=$seed" "$@" > "$OUT/$name-$seed.log" 2>&1 \
    || { tail -20 "$OUT/$name-$seed.log"; exit 1; }
  echo "$(( SECONDS - t ))" > "$dir/wall_seconds"
}
for s in $(seq 0 $(( SEEDS - 1 ))); do
  run kd "$s"
  if [[ -f runs/demo/student/config.json ]]; then run two-step "$s" task.student=runs/demo/student task.head=teacher; fi
  run distillator "$s" loss.alpha_label=0.3333333333 loss.alpha_ce=0.3333333333 loss.alpha_prob_cos=0.3333333333 \
    loss.temperature=1.0
done

say "4/4 the test split: every model as it is -> $OUT/table.md"
"$PY" - "$OUT" "$TASK" "$SEEDS" <<'EOF_PY'
import glob, json, statistics, sys
from pathlib import Path
from pretrain.tasks import SplitConfig, load_task
from pretrain.taskmode import evaluate_classifier
out, task_name, seeds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
task = load_task(task_name, split=SplitConfig(max_eval=1000))
rows = {"teacher (fine-tuned)": [str(out / "ft/teacher/embedded_rotten-tomatoes")]}
base = json.loads((out / "baselines/downstream.json").read_text())
def ft_scores(model):  # the downstream command's test scores per seed
    runs = base["tasks"][task_name]["results"][model]["runs"]
    return [r["score"] for r in runs]
table = []
t = evaluate_classifier(rows["teacher (fine-tuned)"][0], task, "test")
teacher_speed = t["examples_per_s"]
table.append(("teacher (fine-tuned)", [t["score"]], t["params"], 1.0, None))
for model, label in (("layers024", "1. layers 0,2,4 fine-tuned"), ("truncation", "2. truncation fine-tuned")):
    table.append((label, ft_scores(model), None, None, None))
for name, label in (("kd", "3. task-distilled (KD)"), ("two-step", "4. two-step (demo student, then KD)"),
                    ("distillator", "5. Distillator loss")):
    dirs = sorted(glob.glob(str(out / f"{name}-*/student")))
    if not dirs:
        continue
    res = [evaluate_classifier(d, task, "test") for d in dirs]
    walls = [float((Path(d).parent / "wall_seconds").read_text()) for d in dirs if (Path(d).parent / "wall_seconds").is_file()]
    table.append((label, [r["score"] for r in res], res[0]["params"], statistics.mean(r["examples_per_s"] for r in res) / teacher_speed,
                  statistics.mean(walls) if walls else None))
tscore = table[0][1][0]
lines = ["| model | test accuracy (mean ± std) | seeds | share of teacher | speed-up | wall time per run |",
         "| --- | --- | --- | --- | --- | --- |"]
for label, scores, params, speed, wall in table:
    m = statistics.mean(scores); sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
    lines.append(f"| {label} | {m:.4f} ± {sd:.4f} | {len(scores)} | {m / tscore:.1%} | "
                 f"{'-' if speed is None else f'{speed:.2f}x'} | {'-' if wall is None else f'{wall:.0f} s'} |")
text = "\n".join(lines) + "\n"
(out / "table.md").write_text(text)
print(text)
EOF_PY
say "done in $(( (SECONDS - T0) / 60 )) min: $OUT/table.md"
