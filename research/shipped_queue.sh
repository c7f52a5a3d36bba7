#!/bin/bash
# The repair as shipped, on new models (docs/research/repair-shipped.md): each cell trained (research/cpu_matrix.sh),
# then research/trace_repair.py's `trace + unlearning (self-checked)` (fmt-audit repair's defaults, its patch check
# included) and `fine-tuning only`, rows to research/results/trace_repair_TAG.jsonl. Clean twins (-clean-) with
# --clean. Resumable: a trained cell and a written row are not done again. One thread; from the project root with
# its environment active:
#   bash research/shipped_queue.sh TAG CELL ...
#   python research/trace_repair_table.py research/results/trace_repair_TAG.jsonl
root="$(cd "$(dirname "$0")/.." && pwd)"
tag="$1"; shift
for cell in "$@"; do
  OMP_NUM_THREADS=1 bash "$root/research/cpu_matrix.sh" "$cell"
  case "$cell" in *-clean*) clean=--clean ;; *) clean= ;; esac
  # shellcheck disable=SC2086  # empty or one word
  (cd "$root/benchmarks" && PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$cell" \
     --tag "$tag" --methods "trace + unlearning (self-checked),fine-tuning only" $clean)
done
