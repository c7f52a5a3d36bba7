#!/bin/bash
# docs/research/repair-retrace.md: trace + unlearning (re-traced) where the verdict on the repaired model still
# finds the backdoor; the development cells first, then the measured ones as research/cpu_matrix.sh exports
# them. The measured cells' `self-checked` rows (today's escalation, the rule's comparison) go to the self-check
# study's file: research/selfcheck_queue.sh runs them for the replica-1 cells, this queue for replica 2.
# Replica 2 is trained by:
#   bash research/cpu_matrix.sh cifar10-plaincnn-badnets-p10-r2 cifar10-plaincnn-lowfreq-p10-r2 \
#     cifar10-plaincnn-inputaware-p10-r2
# Run from a worktree pinned at the commit that added that page, its research/results a link to main's:
#   git worktree add /work/pinned-retrace COMMIT && cd /work/pinned-retrace && rm -rf research/results \
#     && ln -s /work/main/research/results research/results
#   bash research/retrace_queue.sh          # with the project's environment active
# Resumable: trace_repair.py skips the cell/method pairs already in the results.
. "$(dirname "$0")/matrix_state.sh"
cd "$(dirname "$0")/../benchmarks" || exit 1
run() {   # tag methods cell [--clean]
  until exported "$3"; do sleep 30; done
  PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$3" --tag "$1" --methods "$2" $4
}
R="trace + unlearning (re-traced)"
for cell in cifar10-plaincnn-badnets-p10 cifar10-plaincnn-inputaware-p10; do run retrace "$R" "$cell"; done
for cell in cifar10-plaincnn-badnets-p10-r1 cifar10-plaincnn-lowfreq-p10-r1 cifar10-plaincnn-inputaware-p10-r1 \
    mnist-plaincnn-badnets-p10-r1 mnist-lenet-badnets-p10-r1 mnist-lenet-blended-p10-r1 mnist-lenet-wanet-p10-r1 \
    gtsrb-preact18q-badnets-p10-r1; do
  run retrace "$R" "$cell"
done
run retrace "$R" cifar10-plaincnn-clean-r1 --clean
run retrace "$R" mnist-lenet-clean-r1 --clean
for cell in cifar10-plaincnn-badnets-p10-r2 cifar10-plaincnn-lowfreq-p10-r2 cifar10-plaincnn-inputaware-p10-r2; do
  run retrace "$R,trace + unlearning" "$cell"
  run selfcheck "trace + unlearning (self-checked)" "$cell"
done
