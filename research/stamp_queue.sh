#!/bin/bash
# docs/research/repair-stamp-unlearning.md: the measured cells (replica 1 of each: new models no method has
# seen), each as soon as research/cpu_matrix.sh has trained and exported it, in the order it trains them:
#   bash research/cpu_matrix.sh mnist-lenet-badnets-p10-r1 mnist-lenet-blended-p10-r1 mnist-lenet-wanet-p10-r1 \
#     mnist-lenet-clean-r1 mnist-plaincnn-badnets-p10-r1 gtsrb-preact18q-badnets-p10-r1 \
#     cifar10-plaincnn-badnets-p10-r1 cifar10-plaincnn-lowfreq-p10-r1 cifar10-plaincnn-inputaware-p10-r1 \
#     cifar10-plaincnn-clean-r1
# Run from a worktree pinned at the commit that registered the method, its research/results a link to main's:
#   git worktree add /work/pinned-stamp COMMIT && cd /work/pinned-stamp && rm -rf research/results \
#     && ln -s /work/main/research/results research/results
#   bash research/stamp_queue.sh          # with the project's environment active
# Resumable: trace_repair.py skips the cell/method pairs already in the results. The rule:
#   PYTHONPATH=research python research/head_to_head.py --study stamp research/results/trace_repair_stamp-heldout.jsonl
. "$(dirname "$0")/matrix_state.sh"
cd "$(dirname "$0")/../benchmarks" || exit 1
M="trace + unlearning,trace + stamp unlearning,fine-tuning only"
run() {   # cell [--clean]
  until exported "$1"; do
    # a cell whose training failed is never exported: go on without it (its status in train.json says why)
    training_ended "$1" other && { echo "$1: not trained (cpu-weights/$1/train.json says why)" >&2; return; }
    sleep 30
  done
  PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$1" --tag stamp-heldout --methods "$M" $2
}
for cell in mnist-lenet-badnets-p10-r1 mnist-lenet-blended-p10-r1 mnist-lenet-wanet-p10-r1; do run "$cell"; done
run mnist-lenet-clean-r1 --clean
for cell in mnist-plaincnn-badnets-p10-r1 gtsrb-preact18q-badnets-p10-r1 cifar10-plaincnn-badnets-p10-r1 \
    cifar10-plaincnn-lowfreq-p10-r1 cifar10-plaincnn-inputaware-p10-r1; do
  run "$cell"
done
run cifar10-plaincnn-clean-r1 --clean
