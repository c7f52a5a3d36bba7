#!/bin/bash
# docs/research/trace-warp.md's measurement: per measured cell (in this order, each once it is exported:
# research/cpu_matrix.sh trains them), removal only with this branch's trace (tag measured), then the
# product's self-checked repair from main (MAIN, a checkout of main: today's trace) and from this branch.
# Resumable: each script skips the rows it has. One thread. Run from the branch's checkout, venv active.
#   MAIN=/work/main bash research/trace_warp_queue.sh
. "$(dirname "$0")/matrix_state.sh"
here="$(cd "$(dirname "$0")" && pwd)"
main="${MAIN:?give MAIN, a checkout of main}"
# the twins last: the change acts only where the warp decided, so they decide nothing
cells=(mnist-lenet-wanet-p10-r4 mnist-lenet-wanet-p10-r5 mnist-lenet-wanet-p10-r6 mnist-lenet-wanet-p10-r7
  mnist-lenet-wanet-p10-r8 mnist-lenet-wanet-p10-r9 mnist-plaincnn-wanet-p10 mnist-plaincnn-wanet-p10-r1
  cifar10-plaincnn-wanet-p10 mnist-lenet-clean-r4 mnist-lenet-clean-r5)
cd "$here/../benchmarks"
for cell in "${cells[@]}"; do
  until exported "$cell"; do sleep 60; done
  OMP_NUM_THREADS=1 PYTHONPATH=..:.:../research python ../research/trace_warp.py "matrix:$cell" --tag measured
  for side in main branch; do
    root=..; [ $side = main ] && root="$main"
    OMP_NUM_THREADS=1 PYTHONPATH="$root:." python ../research/trace_repair.py "matrix:$cell" --clean \
      --tag "trace-warp-$side" --methods "trace + unlearning (self-checked)"
  done
done
