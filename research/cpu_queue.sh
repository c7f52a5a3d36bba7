#!/bin/bash
# Issue 31 rows on cells retrained on the CPU (research/cpu_matrix.sh), in the order the open decisions need
# them: the gate's development rows (docs/research/repair-gating.md), then held-out pass 1. Waits for each
# cell's export. Run from a worktree pinned at the frozen method's commit (its research/results a link to
# main's): cd /work/pinned && bash /work/main/research/cpu_queue.sh
cd benchmarks || exit 1
# the pinned commit predates the "(cpu)" labels: without them a retrained cell's rows would take the lost GPU
# model's label and be skipped or mixed with its rows (copy main's benchmarks/cases.py over the pinned one)
grep -q matrix_label cases.py || { echo "benchmarks/cases.py has no matrix_label: copy main's" >&2; exit 1; }
cache="${FMT_AUDIT_BENCH_CACHE:-$HOME/.cache/fmt-audit/benchmarks}/matrix"
M="trace + unlearning,fine-tuning only,unlearning only,i-BAU"
run() {   # tag cell methods [--clean]
  until [ -f "$cache/$2/facts.json" ]; do sleep 30; done
  PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$2" --tag "$1" --methods "$3" $4
}
run dev mnist-lenet-wanet-p10 "$M"
run heldout mnist-plaincnn-badnets-p10 "trace + unlearning,fine-tuning only"
run twins gtsrb-preact18q-clean "fine-tuning only,trace + unlearning" --clean
run dev gtsrb-preact18q-badnets-p10 "$M"
run twins cifar10-plaincnn-clean "fine-tuning only,trace + unlearning" --clean
run heldout gtsrb-preact18q-wanet-p10 "trace + unlearning,fine-tuning only"
run heldout cifar10-plaincnn-inputaware-p10 "trace + unlearning,fine-tuning only"
run heldout cifar10-plaincnn-lowfreq-p10 "trace + unlearning,fine-tuning only"
