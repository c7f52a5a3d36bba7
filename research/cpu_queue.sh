#!/bin/bash
# Issue 31 rows on cells retrained on the CPU (research/cpu_matrix.sh trains and exports them; this waits for
# each export): the held-out head-to-head of trace + unlearning and today's default first (pre-registered in
# docs/research/set-selection.md after pass 1's criterion (2) failed), then the development rows still missing.
# Run from a worktree pinned at the frozen method's commit, its research/results a link to main's and main's
# benchmarks/cases.py copied in (the "(cpu)" labels):
#   git worktree add /work/pinned 4fcb6be && cd /work/pinned && rm -rf research/results \
#     && ln -s /work/main/research/results research/results && cp /work/main/benchmarks/cases.py benchmarks/
#   bash /work/main/research/cpu_queue.sh          # with the project's environment active
# Resumable: trace_repair.py skips the cell/method pairs already in the results.
. "$(dirname "$0")/matrix_state.sh"
cd benchmarks || exit 1
# the pinned commit predates the "(cpu)" labels: without them a retrained cell's rows would take the lost GPU
# model's label and be skipped or mixed with its rows (copy main's benchmarks/cases.py over the pinned one)
grep -q matrix_label cases.py || { echo "benchmarks/cases.py has no matrix_label: copy main's" >&2; exit 1; }
M="trace + unlearning,fine-tuning only,unlearning only,i-BAU"
run() {   # tag cell methods [--clean]
  until exported "$2"; do sleep 30; done
  PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$2" --tag "$1" --methods "$3" $4
}
P1="trace + unlearning,fine-tuning only"
H2H="trace + unlearning,default + unlearning,fine-tuning only"
# a row of an earlier queue's cell still running (its process outlives the queue that started it); other
# studies' rows (other tags) may run beside it
while pgrep -f "trace_repair.py matrix:.* --tag heldout" > /dev/null; do sleep 60; done
# the head-to-head with today's default (docs/research/set-selection.md, pre-registered in the ninth session),
# in the order research/cpu_matrix.sh trains them; MobileNetV2 and full-width cells wait for a GPU
for cell in cifar10-plaincnn-lowfreq-p10 cifar10-vgg-badnets-p01 cifar10-preact18q-badnets-p05 \
    cifar10-preact18q-inputaware-p10 cifar10-preact18q-badnets-p01 cifar10-preact18q-blended-p01; do
  run heldout "$cell" "$H2H"
done
# the held-out pass 1's last cell (its attack did not take, 78% ASR: reported, not counted); after the
# head-to-head, which decides something
run heldout gtsrb-preact18q-wanet-p10 "$P1"
# supplementary: today's default on the held-out cells whose trace + unlearning rows were seen
for cell in cifar10-plaincnn-inputaware-p10 mnist-plaincnn-badnets-p10 gtsrb-preact18q-wanet-p10; do
  run heldout "$cell" "default + unlearning"
done
# development rows (clean twins' cost; the GTSRB development cell)
run twins cifar10-plaincnn-clean "fine-tuning only,trace + unlearning" --clean
run dev gtsrb-preact18q-badnets-p10 "$M"
