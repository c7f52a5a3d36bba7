#!/bin/bash
# docs/research/scan-trace-default.md: removal-only rows on the pre-registered models (resumable), from /work/main
# with the project's environment active; then the rule: python research/flag_removal.py --summary
cd "$(dirname "$0")/../benchmarks" || exit 1
PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/flag_removal.py \
  matrix:cifar10-plaincnn-lowfreq-p10 matrix:cifar10-vgg-badnets-p01 matrix:cifar10-preact18q-badnets-p05 \
  matrix:cifar10-preact18q-badnets-p01 matrix:cifar10-preact18q-blended-p01 matrix:cifar10-plaincnn-inputaware-p10 \
  matrix:mnist-plaincnn-badnets-p10 matrix:mnist-lenet-badnets-p10-r1 matrix:mnist-lenet-blended-p10-r1 \
  matrix:mnist-lenet-wanet-p10-r1 matrix:mnist-plaincnn-badnets-p10-r1 matrix:gtsrb-preact18q-badnets-p10-r1 \
  matrix:cifar10-plaincnn-badnets-p10-r1 matrix:cifar10-plaincnn-lowfreq-p10-r1 \
  matrix:cifar10-plaincnn-inputaware-p10-r1
