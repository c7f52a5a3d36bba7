#!/bin/bash
# docs/research/repair-targeted-unlearning.md: the development rows (tag targeted-dev), from /work/main with the
# project's environment active. Resumable (trace_repair.py skips the rows already written).
cd "$(dirname "$0")/../benchmarks" || exit 1
A="trace + stamp unlearning,trace + targeted stamp unlearning,trace + stamp-only unlearning"
for cell in mnist-lenet-badnets-p10 mnist-lenet-blended-p10 cifar10-preact18q-inputaware-p10 \
    cifar10-plaincnn-badnets-p10; do
  PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$cell" --tag targeted-dev --methods "$A"
done
