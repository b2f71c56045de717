#!/usr/bin/env bash
# Task distillation on the embedded default (`make task-demo`; docs/task-distillation.md has the table it makes).
#
#   scripts/task_demo.sh [PYTHON]          (PYTHON also from $PYTHON; default python3)
#
# 1. teacher  all-MiniLM-L6-v2 fine-tuned on embedded:rotten-tomatoes (python -m pretrain.downstream --save-model)
# 2. baselines fine-tuned directly, $SEEDS seeds: the 3-layer student (teacher layers 0, 2, 4 of the sentence encoder)
#    and the top-layer truncation (its first 3 layers), with the teacher's protocol
# 3. task distillation from the fine-tuned teacher, $SEEDS seeds each (configs/task-demo.json):
#    kd          the fine-tuned teacher's layers 0, 2, 4 and its head, KL on the class distributions
#    kd-general  the same KD from the untuned layers 0, 2, 4 of row 1 with the teacher's head (task.student): the
#                starting point of the two-step rows, without their general distillation
#    two-step    the demo's task-agnostic student (runs/demo/student, `make demo`), then the same task distillation;
#                also from the showcase's student (runs/showcase/student, `make showcase`) when it is there
#    distillator the Distillator loss as written: label CE + soft CE + probability cosine, averaged, T = 1
# 4. every model scored on the test split as it is (python -m pretrain.taskmode evaluate); the table -> $OUT/table.md
# 5. the moonshot: row 5's student width-pruned (python -m pretrain.tasks.prune_task; $PRUNE), task-distilled again
# 6. deployment: the teacher, row 5 and row 6 in ONNX fp32 and int8 (each folder's onnx/), the checks, accuracy on dev
#    and test, speed at batch 1 and 32 in PyTorch / ONNX fp32 / int8, interleaved (python -m pretrain.tasks.deploy_rows)
#
# Every step reuses what a previous run finished. Environment: SEEDS (3), TRAIN (2000 examples), OUT (runs/task),
# PRUNE (step 5's sizes).
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

say "1/6 teacher: all-MiniLM-L6-v2 fine-tuned on $TASK ($TRAIN examples, 3 epochs) -> $TEACHER"
if [[ ! -f $TEACHER/config.json ]]; then
  "$PY" -m pretrain.downstream --task "$TASK" --model teacher=embedded:minilm-l6 --seeds 1 --save-model "$OUT/ft" \
    --output "$OUT/teacher-ft" --max-train "$TRAIN" --epochs 3 --no-plot
fi

say "2/6 baselines fine-tuned directly ($SEEDS seeds): layers 0,2,4 and the top-layer truncation"
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

say "3/6 task distillation ($SEEDS seeds each; configs/task-demo.json)"
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
  run kd-general "$s" "task.student=$OUT/models/layers024" task.head=teacher
  if [[ -f runs/demo/student/config.json ]]; then run two-step "$s" task.student=runs/demo/student task.head=teacher; fi
  if [[ -f runs/showcase/student/config.json ]]; then
    run two-step-showcase "$s" task.student=runs/showcase/student task.head=teacher
  fi
  run distillator "$s" loss.alpha_label=0.3333333333 loss.alpha_ce=0.3333333333 loss.alpha_prob_cos=0.3333333333 \
    loss.temperature=1.0
done

say "4/6 the test split: every model as it is -> $OUT/table.md"
"$PY" - "$OUT" "$TASK" <<'EOF_PY'
import glob, json, statistics, sys
from pathlib import Path
from pretrain.tasks import SplitConfig, load_task
from pretrain.taskmode import evaluate_classifier
from data_prep.files import atomic_write_text
out, task_name = Path(sys.argv[1]), sys.argv[2]
task = load_task(task_name, split=SplitConfig(max_eval=1000))
slug = task_name.replace(":", "_")
teacher = evaluate_classifier(str(out / "ft/teacher" / slug), task, "test")
teacher_ft = json.loads((out / "teacher-ft/downstream.json").read_text())["tasks"][task_name]["results"]["teacher"]
rows = [("teacher (fine-tuned)", [teacher["score"]], [r.get("dev_score") for r in teacher_ft["runs"]], 1.0,
         statistics.mean(r["seconds"] for r in teacher_ft["runs"]))]
base = json.loads((out / "baselines/downstream.json").read_text())["tasks"][task_name]["results"]
for model, label in (("layers024", "1. layers 0,2,4 fine-tuned"), ("truncation", "2. truncation fine-tuned")):
    runs = base[model]["runs"]  # the downstream command's scores; the speed of its saved seed-0 model, measured alike
    speed = evaluate_classifier(str(out / "baselines/models" / model / slug), task, "test")["examples_per_s"]
    rows.append((label, [r["score"] for r in runs], [r.get("dev_score") for r in runs], speed / teacher["examples_per_s"],
                 statistics.mean(r["seconds"] for r in runs)))
for name, label in (("kd", "3. task-distilled (KD)"), ("kd-general", "3b. KD from the untuned layers 0,2,4"),
                    ("two-step", "4. two-step (demo student, then KD)"),
                    ("two-step-showcase", "4b. two-step (showcase student, then KD)"),
                    ("distillator", "5. Distillator loss")):
    dirs = sorted(glob.glob(str(out / f"{name}-[0-9]*/student")))
    if not dirs:
        continue
    res = [evaluate_classifier(d, task, "test") for d in dirs]
    dev = []
    for d in dirs:  # the dev metric of the run's last in-run evaluation
        evals = [json.loads(x) for x in (Path(d).parent / "metrics.jsonl").read_text().splitlines() if '"eval_split"' in x]
        dev.append(evals[-1]["task_score"] if evals else None)
    walls = [float(w.read_text()) for d in dirs if (w := Path(d).parent / "wall_seconds").is_file()]
    rows.append((label, [r["score"] for r in res], dev,
                 statistics.mean(r["examples_per_s"] for r in res) / teacher["examples_per_s"],
                 statistics.mean(walls) if walls else None))
def ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"
tscore = rows[0][1][0]
lines = ["| model | test accuracy (mean ± std) | dev accuracy | seeds | share of teacher | speed-up | wall time per run |",
         "| --- | --- | --- | --- | --- | --- | --- |"]
for label, scores, dev, speed, wall in rows:
    lines.append(f"| {label} | {ms(scores)} | {ms(dev)} | {len(scores)} | {statistics.mean(scores) / tscore:.1%} | "
                 f"{speed:.2f}x | {'-' if wall is None else f'{wall:.0f} s'} |")
text = "\n".join(lines) + "\n"
atomic_write_text(out / "table.md", text)
print(text)
EOF_PY

# The moonshot (docs/task-distillation.md): width as well as depth. Row 5's student, pruned on 256 of its train
# examples (python -m pretrain.tasks.prune_task: Minitron importance, docs/pruning.md), then task-distilled again.
PRUNE=${PRUNE:---hidden-size 256 --num-attention-heads 8 --intermediate-size 768}
say "5/6 the moonshot: row 5 width-pruned ($PRUNE), then task-distilled again ($SEEDS seeds)"
for s in $(seq 0 $(( SEEDS - 1 ))); do
  if [[ ! -f $OUT/models/pruned-$s/config.json ]]; then
    # shellcheck disable=SC2086  # PRUNE is a list of options
    "$PY" -m pretrain.tasks.prune_task "$OUT/distillator-$s/student" "$OUT/models/pruned-$s" --task "$TASK" \
      --max-train "$TRAIN" --seed "$s" $PRUNE
  fi
  run pruned "$s" "task.student=$OUT/models/pruned-$s" task.head=new loss.alpha_label=0.3333333333 \
    loss.alpha_ce=0.3333333333 loss.alpha_prob_cos=0.3333333333 loss.temperature=1.0
done

say "6/6 deployment: ONNX fp32 and int8, checked on dev and test, timed interleaved -> $OUT/deploy/deploy.md"
"$PY" -m pretrain.tasks.deploy_rows --task "$TASK" --teacher "$TEACHER" --output "$OUT/deploy" \
  --row "5. Distillator loss=$OUT/distillator-[0-9]*/student" \
  --row "6. row 5 pruned, task-distilled again=$OUT/pruned-[0-9]*/student" \
  || [[ $? -eq 1 ]]  # 1: a check failed; the table says which
say "done in $(( (SECONDS - T0) / 60 )) min: $OUT/table.md, $OUT/deploy/deploy.md"
