#!/bin/bash
# docs/research/repair-self-check.md, "Second measurement": the repair that ships, with its self-check, on the
# replica 2 models of docs/research/scan-trace-h2h.md (trained by research/scan_h2h_queue.sh; a cell is waited
# for until that queue has its row, so its verdict and trace are cached once). From main with the project's
# environment active; resumable.
#   bash research/selfcheck_stamp_queue.sh
#   python research/trace_repair_table.py research/results/trace_repair_selfcheck-stamp.jsonl --self-check
. "$(dirname "$0")/matrix_state.sh"
cd "$(dirname "$0")/../benchmarks" || exit 1
for cell in mnist-lenet-badnets-p10-r2 mnist-lenet-blended-p10-r2 mnist-lenet-wanet-p10-r2 mnist-lenet-clean-r2 \
    mnist-plaincnn-badnets-p10-r2 gtsrb-preact18q-badnets-p10-r2 cifar10-plaincnn-badnets-p10-r2 \
    cifar10-plaincnn-lowfreq-p10-r2 cifar10-plaincnn-inputaware-p10-r2 cifar10-plaincnn-clean-r2; do
  until grep -qs "matrix $cell (cpu)\"" ../research/results/flag_removal_h2h.jsonl; do sleep 30; done
  case "$cell" in *-clean-r*) clean=--clean ;; *) clean= ;; esac
  PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$cell" --tag selfcheck-stamp \
    --methods "trace + unlearning (self-checked)" $clean
done
