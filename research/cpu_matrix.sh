#!/bin/bash
# Retrain matrix cells on the CPU where the GPU-trained weights are not in the cache (a new machine), one
# cell at a time, each exported as soon as it is trained; facts.json says `trained_on: cpu` and research
# rows label such a cell "(cpu)". Resumable: an exported cell is skipped, and a cell killed in training goes on
# from its last whole epoch (--resume; on the CPU bit-identical to an unbroken run); a trained cell whose
# export did not finish is exported without training it again. One thread unless THREADS is set.
# Measured CPU minutes per cell (one thread, 2026-12-05): MNIST LeNet 0.3, MNIST plain CNN 5, GTSRB
# PreAct quarter 9, CIFAR-10 plain CNN 22, VGG 38, PreAct quarter 53, MobileNetV2 166 (estimates from
# timed steps except the MNIST cells).
#   bash research/cpu_matrix.sh gtsrb-preact18q-clean cifar10-plaincnn-clean ...
# The held-out cells research/cpu_queue.sh waits for, cheapest first:
#   bash research/cpu_matrix.sh gtsrb-preact18q-wanet-p10 cifar10-plaincnn-inputaware-p10 \
#     cifar10-plaincnn-lowfreq-p10 cifar10-vgg-badnets-p01 cifar10-preact18q-badnets-p05 \
#     cifar10-preact18q-inputaware-p10 cifar10-preact18q-badnets-p01 cifar10-preact18q-blended-p01 \
#     cifar10-plaincnn-clean gtsrb-preact18q-badnets-p10
. "$(dirname "$0")/matrix_state.sh"
cd "$(dirname "$0")/../benchmarks"   # run with the project's environment active
[ -d ../.gpudata ] || python matrix.py pack
for cell in "$@"; do
  if exported "$cell"; then
    echo "$cell: exported already"; continue
  fi
  # trained, but the export did not finish: export only (train would start by removing the weights)
  if ! training_ended "$cell" done; then
    python matrix.py train --out "$cpu_weights/$cell" --workers 0 --threads "${THREADS:-1}" --cpu --budget-s 100000 \
      --resume --only "$cell" || continue
  fi
  python matrix.py export --weights "$cpu_weights/$cell" --only "$cell" --results results/matrix_cpu.json
done
