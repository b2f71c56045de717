#!/usr/bin/env bash
# Run the tests that assert a learning result or a float tolerance under each CPU kernel set and thread count, one
# variant after another, and print the table of measured effects (docs/testing.md).
#   scripts/measure_test_effects.sh OUT_DIR [pytest selection...]
# Variants: OMP_NUM_THREADS=1 / 2 (THREADS) x ATEN_CPU_CAPABILITY=default / avx2 / avx512 where /proc/cpuinfo lists
# avx512f (CAPS). MARK: a pytest -m expression (default: every test of the selection, slow ones too).
# Each variant writes OUT_DIR/<variant>.jsonl (tests/helpers.py records) and OUT_DIR/<variant>.log.
set -u
out=${1:?usage: scripts/measure_test_effects.sh OUT_DIR [pytest selection...]}
shift
mkdir -p "$out"
py=${PYTHON:-python}
if [ $# -eq 0 ]; then  # the tests that assert a learning result or a float tolerance (fast ones; docs/testing.md)
    set -- tests/test_taskmode.py::test_head_is_copied_and_the_dev_metric_improves \
        tests/test_downstream.py::test_finetune_lowers_the_loss_and_beats_chance_on_real_data \
        tests/test_downstream.py::test_probe_beats_chance tests/test_downstream.py::test_regression_and_pair_paths \
        tests/test_data_prep_embedded.py::test_teachers_load tests/test_evaluate.py::test_teacher_reference_values \
        tests/test_evaluate.py::test_copied_student_beats_random_student \
        tests/test_prune.py::test_importance_ranks_a_silenced_head_neuron_and_channel_last \
        tests/test_distill.py tests/test_student.py::test_distilbert_conversion \
        --deselect tests/test_distill.py::test_compiled_parts_give_the_eager_values_without_recompiling
fi
caps="default avx2"
grep -qw avx512f /proc/cpuinfo 2>/dev/null && caps="$caps avx512"
for threads in ${THREADS:-1 2}; do
    for cap in ${CAPS:-$caps}; do
        v="$cap-t$threads"
        rm -f "$out/$v.jsonl"
        echo "== $v: $(date +%T)"
        ATEN_CPU_CAPABILITY=$cap OMP_NUM_THREADS=$threads BERT_DISTILL_TEST_EFFECTS="$out/$v.jsonl" \
            "$py" -m pytest -q -s -p no:cacheprovider -m "${MARK:-not slow or slow}" --basetemp "$out/tmp-$v" "$@" \
            >"$out/$v.log" 2>&1
        echo "   rc $? $(tail -1 "$out/$v.log")"
        rm -rf "$out/tmp-$v"
    done
done
"$py" scripts/effects_table.py "$out"/*.jsonl
