#!/bin/bash
# Issue 31's "DER above ANP and i-BAU in the same run": the field's two removal defenses (`repair --method
# anp|ibau`, their references' defaults, no fine-tuning) on the cells of the stamp study's measurement
# (docs/research/repair-stamp-unlearning.md: replica 1 of each cell, same defender data, split, seed and
# evaluation as its rows), then that study's clean twin on CIFAR-10 (reported, decides nothing). A measurement:
# no method is chosen by it. Run from main with the project's environment active; resumable (trace_repair.py
# skips the cell/method pairs already in the results). A cell not in the cache is retrained first
# (research/cpu_matrix.sh), which does not always give the same ONNX file (the rows name their model's sha256:
# compare methods only on rows of one model, benchmarks/results/matrix_cpu.json the one measured). Cells given as arguments run in that order (two lanes on two cores:
# run the script twice with disjoint cells); none given: all of them.
#   bash research/baselines_queue.sh
#   bash research/baselines_queue.sh gtsrb-preact18q-badnets-p10-r1 cifar10-plaincnn-lowfreq-p10-r1 &
#   bash research/baselines_queue.sh cifar10-plaincnn-badnets-p10-r1 cifar10-plaincnn-clean-r1 &
#   PYTHONPATH=research python research/trace_repair_table.py research/results/trace_repair_stamp-heldout.jsonl
# TAG names the rows' file (default stamp-heldout); docs/research/repair-vs-anp-ibau.md runs replica 2:
#   TAG=baselines-r2 bash research/baselines_queue.sh cifar10-plaincnn-badnets-p10-r2 ...
. "$(dirname "$0")/matrix_state.sh"
here="$(cd "$(dirname "$0")" && pwd)"
B="ANP,i-BAU"
tag="${TAG:-stamp-heldout}"
cells=("$@")
[ ${#cells[@]} -gt 0 ] || cells=(mnist-lenet-badnets-p10-r1 mnist-lenet-blended-p10-r1 mnist-lenet-wanet-p10-r1
  mnist-plaincnn-badnets-p10-r1 gtsrb-preact18q-badnets-p10-r1 cifar10-plaincnn-clean-r1
  cifar10-plaincnn-badnets-p10-r1 cifar10-plaincnn-lowfreq-p10-r1 cifar10-plaincnn-inputaware-p10-r1)
for cell in "${cells[@]}"; do
  exported "$cell" || bash "$here/cpu_matrix.sh" "$cell"
  exported "$cell" || { echo "$cell: not exported" >&2; continue; }
  case "$cell" in
    *-clean-r*) methods="trace + unlearning,trace + stamp unlearning,fine-tuning only"; clean=--clean ;;
    *) methods="$B"; clean= ;;
  esac
  (cd "$here/../benchmarks" && PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$cell" \
    --tag "$tag" --methods "$methods" $clean)
done
