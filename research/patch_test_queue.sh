#!/bin/bash
# The third self-check measurement (docs/research/repair-self-check.md, "Third measurement"): each cell trained
# (research/cpu_matrix.sh), its two repairs kept (tag patch-test), then the patch evidence and its try on both.
# Resumable: a trained cell, a repair row and a probe row already written are not done again. One thread; run
# from the project root with its environment active:
#   bash research/patch_test_queue.sh mnist-lenet-badnets-p10-r5 mnist-lenet-blended-p10-r5 ...
root="$(cd "$(dirname "$0")/.." && pwd)"
for cell in "$@"; do
  OMP_NUM_THREADS=1 bash "$root/research/cpu_matrix.sh" "$cell"
  (cd "$root/benchmarks" && PYTHONPATH=. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$cell" \
     --tag patch-test --methods "trace + unlearning (self-checked),trace + fine-tuning" --keep-models)
  for method in trace-unlearning-self-checked trace-fine-tuning; do
    if grep -q "\"matrix $cell (cpu)\", \"repaired\": \"repaired_patch-test_$method.onnx\"" \
        "$root/research/results/patch_unlearning_probe-patch-test.jsonl" 2> /dev/null; then continue; fi
    TAG=patch-test METHODS=$method ARGS="--tag patch-test" bash "$root/research/patch_probe_queue.sh" "$cell"
  done
done
