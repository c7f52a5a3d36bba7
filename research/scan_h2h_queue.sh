#!/bin/bash
# docs/research/scan-trace-h2h.md: the pre-registered models (replica 2, trained here on the CPU when not in the
# cache), then per model the verdict, the trace and the per-channel default scan on the training split
# (trace_repair.py: "trace removal only", "default removal only"; cached beside the cell) and the removal-only
# rows with random channels (flag_removal.py --h2h). Resumable; from main with the project's environment active.
# Cells given as arguments run in that order (two lanes: two runs with disjoint cells); none given: all of them.
#   bash research/scan_h2h_queue.sh
#   python research/flag_removal.py --summary --h2h
. "$(dirname "$0")/matrix_state.sh"
here="$(cd "$(dirname "$0")" && pwd)"
cells=("$@")
[ ${#cells[@]} -gt 0 ] || cells=(mnist-lenet-badnets-p10-r2 mnist-lenet-blended-p10-r2 mnist-lenet-wanet-p10-r2
  mnist-lenet-clean-r2 mnist-plaincnn-badnets-p10-r2 gtsrb-preact18q-badnets-p10-r2 cifar10-plaincnn-badnets-p10-r2
  cifar10-plaincnn-lowfreq-p10-r2 cifar10-plaincnn-inputaware-p10-r2 cifar10-plaincnn-clean-r2)
for cell in "${cells[@]}"; do
  exported "$cell" || bash "$here/cpu_matrix.sh" "$cell"
  exported "$cell" || { echo "$cell: not exported" >&2; continue; }
  case "$cell" in *-clean-r*) clean=--clean ;; *) clean= ;; esac
  (cd "$here/../benchmarks" && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/trace_repair.py \
    "matrix:$cell" --tag scan-h2h --methods "trace removal only,default removal only" $clean &&
   PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/flag_removal.py --h2h "matrix:$cell")
done
