#!/bin/bash
# The held try beside the third self-check measurement (docs/research/repair-self-check.md, "the try as the library
# would run it"): on each repaired model of CELLS where P fired in the registered rows, the target's patch searched
# again (the same seeded search: the same patch) and the try run with the removed channels held at zero. Rows:
# research/results/patch_unlearning_probe-patch-test-held.jsonl; a row already written is not done again. One
# thread; run from the project root with its environment active, after research/patch_test_queue.sh's rows:
#   bash research/patch_held_queue.sh cifar10-plaincnn-badnets-p10-r5 ...
root="$(cd "$(dirname "$0")/.." && pwd)"
rows="$root/research/results/patch_unlearning_probe-patch-test.jsonl"
held="$root/research/results/patch_unlearning_probe-patch-test-held.jsonl"
for cell in "$@"; do
  for method in trace-unlearning-self-checked trace-fine-tuning; do
    file="repaired_patch-test_$method.onnx"
    fired=$(cd "$root/research" && python -c "
import json, sys
from patch_test_table import fires
rows = [json.loads(l) for l in open('$rows') if l.strip()]
print(any(r['model'] == 'matrix $cell (cpu)' and r['repaired'] == '$file' and fires(r) for r in rows))")
    [ "$fired" = True ] || continue
    if grep -q "\"matrix $cell (cpu)\", \"repaired\": \"$file\"" "$held" 2> /dev/null; then continue; fi
    (cd "$root/benchmarks" && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/patch_unlearning_probe.py \
       "matrix:$cell" --repaired "$file" --coarse 5 --target-only --hold-removed --tag patch-test-held)
  done
done
