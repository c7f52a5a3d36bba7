#!/bin/bash
# The fourth self-check measurement (docs/research/repair-self-check.md, "Fourth measurement"): each cell trained
# (research/cpu_matrix.sh), its two repairs kept (tag patch-test, as the third measurement's), then the anchored
# patch (research/patch_spot_probe.py) and its try on both. Resumable: a trained cell, a repair row and a probe
# row already written are not done again. One thread; run from the project root with its environment active:
#   bash research/spot_test_queue.sh mnist-lenet-badnets-p10-r6 ...
root="$(cd "$(dirname "$0")/.." && pwd)"
for cell in "$@"; do
  OMP_NUM_THREADS=1 bash "$root/research/cpu_matrix.sh" "$cell"
  (cd "$root/benchmarks" && PYTHONPATH=. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$cell" \
     --tag patch-test --methods "trace + unlearning (self-checked),trace + fine-tuning" --keep-models)
  for method in trace-unlearning-self-checked trace-fine-tuning; do
    file="repaired_patch-test_$method.onnx"
    if grep -q "\"matrix $cell (cpu)\", \"repaired\": \"$file\"" \
        "$root/research/results/patch_spot_probe-spot-test.jsonl" 2> /dev/null; then continue; fi
    (cd "$root/benchmarks" && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/patch_spot_probe.py \
       "matrix:$cell" --repaired "$file" --tag spot-test)
  done
done
