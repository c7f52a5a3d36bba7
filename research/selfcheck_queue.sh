#!/bin/bash
# docs/research/repair-self-check.md: the product's repair with its self-check (`trace + unlearning,
# self-checked`) on every cell with a trace + unlearning row, cheapest first; a cell not exported yet is
# waited for. Run from a worktree pinned at the commit that added that page, its research/results a link to main's:
#   git worktree add /work/pinned-selfcheck COMMIT && cd /work/pinned-selfcheck && rm -rf research/results \
#     && ln -s /work/main/research/results research/results
#   bash research/selfcheck_queue.sh          # with the project's environment active
# Resumable: trace_repair.py skips the cell/method pairs already in the results.
. "$(dirname "$0")/matrix_state.sh"
cd "$(dirname "$0")/../benchmarks" || exit 1
run() {   # cell [--clean]
  until exported "$1"; do sleep 30; done
  PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$1" --tag selfcheck \
    --methods "trace + unlearning (self-checked)" $2
}
# first the cells where trace + unlearning left the most (does the check see it? does its stronger try help?)
for cell in cifar10-plaincnn-badnets-p10 cifar10-plaincnn-inputaware-p10 mnist-lenet-badnets-p10 \
    mnist-lenet-blended-p10 mnist-lenet-wanet-p10 mnist-lenet-badnets-p10-r1 mnist-lenet-blended-p10-r1 \
    mnist-lenet-wanet-p10-r1; do
  run "$cell"
done
run mnist-lenet-clean --clean
run mnist-lenet-clean-r1 --clean
for cell in mnist-plaincnn-badnets-p10 mnist-plaincnn-badnets-p10-r1 cifar10-plaincnn-lowfreq-p10; do
  run "$cell"
done
run mnist-plaincnn-clean --clean
run cifar10-plaincnn-clean --clean
for cell in gtsrb-preact18q-badnets-p10 cifar10-plaincnn-badnets-p10-r1 cifar10-vgg-badnets-p01 \
    cifar10-preact18q-badnets-p05 gtsrb-preact18q-badnets-p10-r1 cifar10-plaincnn-lowfreq-p10-r1 \
    cifar10-plaincnn-inputaware-p10-r1; do
  run "$cell"
done
run gtsrb-preact18q-clean --clean
