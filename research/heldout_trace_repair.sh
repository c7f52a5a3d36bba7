#!/bin/bash
# issue 31: the frozen trace + unlearning rule on the held-out cells, once, one cell at a time (resumable)
# Two passes, so that the comparison that decides the default (trace + unlearning against fine-tuning alone)
# covers every cell before the slower rows (i-BAU, the unlearning-only ablation) are added.
cd "$(dirname "$0")/../benchmarks"   # run with the project's environment active
CELLS=" cifar10-preact18q-sig-p10 cifar10-mobilenetv2-badnets-p10 cifar10-vgg-wanet-p10 gtsrb-vgg-blended-p10 \
    cifar10-preact18q-lowfreq-p10 mnist-plaincnn-badnets-p10 cifar10-preact18q-badnets-p05 cifar10-plaincnn-inputaware-p10 \
    cifar10-preact18q-inputaware-p10 cifar10-preact18-badnets-p10 cifar10-mobilenetv2-issba-p10 cifar10-mobilenetv2-sig-p10 \
    cifar10-plaincnn-lowfreq-p10 gtsrb-preact18q-wanet-p10 cifar10-preact18q-badnets-p01 cifar10-preact18q-blended-p01 \
    cifar10-vgg-badnets-p01"
for methods in "trace + unlearning,fine-tuning only" "i-BAU,unlearning only"; do
  for cell in $CELLS; do
    PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py matrix:$cell --tag heldout --methods "$methods"
  done
done
