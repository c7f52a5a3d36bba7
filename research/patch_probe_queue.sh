#!/bin/bash
# Development rows of research/patch_unlearning_probe.py (docs/research/repair-self-check.md): for each cell, the
# repairs TAG kept (research/trace_repair.py --keep-models), each searched with the patch (the coarse-then-keep
# search) and, where it is the product's repair, its stronger try. METHODS: the repairs to probe, by the file
# name's method part. One thread; run from the project root with its environment active.
#   TAG=patch-dev-a METHODS="trace-unlearning-self-checked fine-tuning-only" bash research/patch_probe_queue.sh \
#     mnist-lenet-badnets-p10-r3
. "$(dirname "$0")/matrix_state.sh"
cd "$(dirname "$0")/../benchmarks"
for cell in "$@"; do
  for method in ${METHODS:-trace-unlearning-self-checked}; do
    file="repaired_${TAG}_${method}.onnx"
    [ -f "$bench_cache/matrix/$cell/$file" ] || { echo "$cell: no $file"; continue; }
    PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/patch_unlearning_probe.py "matrix:$cell" \
      --repaired "$file" --coarse 5 ${ARGS:-}
  done
done
