#!/bin/bash
# The fifth self-check measurement (docs/research/repair-self-check.md, "Fifth measurement"): each cell trained
# (research/cpu_matrix.sh), its two repairs kept (tag patch-test, as the third and fourth measurements'), then the
# anchored patch, its try and the try's re-check (research/patch_spot_probe.py --recheck) on both. Resumable as
# research/spot_test_queue.sh (whose rows, tag spot-test, this does not touch). One thread; from the project root
# with its environment active:
#   bash research/tried_test_queue.sh cifar10-plaincnn-badnets-p10-r10 ...
root="$(cd "$(dirname "$0")/.." && pwd)"
rows="$root/research/results/patch_spot_probe-tried-test.jsonl"
for cell in "$@"; do
  OMP_NUM_THREADS=1 bash "$root/research/cpu_matrix.sh" "$cell"
  (cd "$root/benchmarks" && PYTHONPATH=. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$cell" \
     --tag patch-test --methods "trace + unlearning (self-checked),trace + fine-tuning" --keep-models)
  for method in trace-unlearning-self-checked trace-fine-tuning; do
    file="repaired_patch-test_$method.onnx"
    if grep -q "\"matrix $cell (cpu)\", \"repaired\": \"$file\"" "$rows" 2> /dev/null; then continue; fi
    (cd "$root/benchmarks" && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/patch_spot_probe.py \
       "matrix:$cell" --repaired "$file" --tag tried-test --recheck)
  done
done
