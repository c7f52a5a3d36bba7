#!/bin/bash
# issue 31: the development clean twins (ACC cost, and the verdict on the repaired model; the rows that
# docs/research/repair-gating.md is judged on), then the development cells still missing rows
# (resumable: finished cell/method pairs are skipped)
cd "$(dirname "$0")/../benchmarks"   # run with the project's environment active
for cell in mnist-lenet-clean cifar10-preact18q-clean cifar10-vgg-clean cifar10-plaincnn-clean gtsrb-preact18q-clean; do
  PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py matrix:$cell --clean --tag twins \
    --methods "fine-tuning only,trace + unlearning"
done
M="trace + unlearning,fine-tuning only,unlearning only,i-BAU"
for cell in cifar10-preact18q-wanet-p10 gtsrb-preact18q-badnets-p10 mnist-lenet-wanet-p10; do
  PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py matrix:$cell --tag dev --methods "$M"
done
