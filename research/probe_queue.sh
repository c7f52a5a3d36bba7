#!/bin/bash
# The self-check measurements' queue (docs/research/repair-self-check.md, fourth and fifth measurements): each cell
# trained (research/cpu_matrix.sh), its two repairs kept (tag patch-test), then research/patch_spot_probe.py on
# both with the probe's options, rows to research/results/patch_spot_probe-TAG.jsonl. Resumable: a trained cell, a
# repair row and a probe row already written are not done again. One thread; from the project root with its
# environment active (research/spot_test_queue.sh and research/tried_test_queue.sh name the tag and options):
#   bash research/probe_queue.sh TAG "PROBE OPTIONS" CELL ...
root="$(cd "$(dirname "$0")/.." && pwd)"
tag="$1"; options="$2"; shift 2
rows="$root/research/results/patch_spot_probe-$tag.jsonl"
for cell in "$@"; do
  OMP_NUM_THREADS=1 bash "$root/research/cpu_matrix.sh" "$cell"
  (cd "$root/benchmarks" && PYTHONPATH=. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$cell" \
     --tag patch-test --methods "trace + unlearning (self-checked),trace + fine-tuning" --keep-models)
  for method in trace-unlearning-self-checked trace-fine-tuning; do
    file="repaired_patch-test_$method.onnx"
    if grep -q "\"matrix $cell (cpu)\", \"repaired\": \"$file\"" "$rows" 2> /dev/null; then continue; fi
    # shellcheck disable=SC2086  # the options are words
    (cd "$root/benchmarks" && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/patch_spot_probe.py \
       "matrix:$cell" --repaired "$file" --tag "$tag" $options)
  done
done
