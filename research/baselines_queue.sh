#!/bin/bash
# Issue 31's "DER above ANP and i-BAU in the same run": the field's two removal defenses (`repair --method
# anp|ibau`, their references' defaults, no fine-tuning) on the cells of the stamp study's measurement
# (docs/research/repair-stamp-unlearning.md: replica 1 of each cell, same defender data, split, seed and
# evaluation as its rows), then that study's clean twin on CIFAR-10 (reported, decides nothing). A measurement:
# no method is chosen by it. Run from main with the project's environment active; resumable (trace_repair.py
# skips the cell/method pairs already in the results).
#   bash research/baselines_queue.sh
#   PYTHONPATH=research python research/trace_repair_table.py research/results/trace_repair_stamp-heldout.jsonl
. "$(dirname "$0")/matrix_state.sh"
cd "$(dirname "$0")/../benchmarks" || exit 1
run() {   # cell methods [--clean]
  exported "$1" || { echo "$1: not exported" >&2; return; }
  PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$1" --tag stamp-heldout --methods "$2" $3
}
B="ANP,i-BAU"
for cell in mnist-lenet-badnets-p10-r1 mnist-lenet-blended-p10-r1 mnist-lenet-wanet-p10-r1 \
    mnist-plaincnn-badnets-p10-r1 gtsrb-preact18q-badnets-p10-r1; do
  run "$cell" "$B"
done
run cifar10-plaincnn-clean-r1 "trace + unlearning,trace + stamp unlearning,fine-tuning only" --clean
for cell in cifar10-plaincnn-badnets-p10-r1 cifar10-plaincnn-lowfreq-p10-r1 cifar10-plaincnn-inputaware-p10-r1; do
  run "$cell" "$B"
done
