#!/bin/bash
# docs/research/repair-universal-unlearning.md, the pre-registered test: each cell trained where it is not
# (research/cpu_matrix.sh), then research/trace_repair.py's `trace + re-fitted universal unlearning (self-checked)`,
# and the shipped repair `trace + unlearning (self-checked)` where research/results/trace_repair_shipped.jsonl has no
# row for the cell; rows to research/results/trace_repair_universal-test.jsonl. Resumable: a method with a row for the
# cell in that file is not run again. One thread; from the project root with its environment active:
#   bash research/universal_test_queue.sh cifar10-plaincnn-lowfreq-p10-r8 cifar10-plaincnn-lowfreq-p10-r9 ...
root="$(cd "$(dirname "$0")/.." && pwd)"
rows="$root/research/results/trace_repair_universal-test.jsonl"
shipped="$root/research/results/trace_repair_shipped.jsonl"
has() { grep -F "\"matrix $1 (cpu)\"" "$2" 2>/dev/null | grep -qF "\"method\": \"$3\""; }
for cell in "$@"; do
  OMP_NUM_THREADS=1 bash "$root/research/cpu_matrix.sh" "$cell"
  methods=()
  has "$cell" "$rows" "trace + re-fitted universal unlearning (self-checked)" ||
    methods+=("trace + re-fitted universal unlearning (self-checked)")
  has "$cell" "$shipped" "trace + unlearning (self-checked)" || has "$cell" "$rows" "trace + unlearning (self-checked)" ||
    methods+=("trace + unlearning (self-checked)")
  [ ${#methods[@]} -eq 0 ] && { echo "$cell: done"; continue; }
  list=$(IFS=,; echo "${methods[*]}")
  (cd "$root/benchmarks" && PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$cell" \
     --tag universal-test --methods "$list")
done
