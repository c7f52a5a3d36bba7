#!/bin/bash
# Development probe (research/warp_probe.py): the smooth-warp search on WaNet models, clean twins and patch
# backdoors, MNIST and GTSRB, models trained here on the CPU where missing (research/cpu_matrix.sh). From main
# with the project's environment active; rows appended to research/results/warp_probe.jsonl.
#   bash research/warp_probe_queue.sh
. "$(dirname "$0")/matrix_state.sh"
here="$(cd "$(dirname "$0")" && pwd)"
probe() {   # CELL [--clean]
  exported "$1" || bash "$here/cpu_matrix.sh" "$1"
  grep -qs "\"matrix $1 (cpu)\"" "$here/results/warp_probe.jsonl" && return
  (cd "$here/../benchmarks" && PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/warp_probe.py "matrix:$1" \
    --budgets 0.5,1 "${@:2}")
}
probe mnist-lenet-wanet-p10-r3
probe mnist-lenet-clean-r3 --clean
probe mnist-lenet-badnets-p10-r2
probe mnist-lenet-blended-p10-r2
probe mnist-plaincnn-badnets-p10-r2
probe gtsrb-preact18q-wanet-p10
probe gtsrb-preact18q-clean --clean
# development populations (research/verdict_population.py's models 0-5: both halves of each architecture)
for dataset in digits mnist cifar10 gtsrb; do
  (cd "$here/../benchmarks" && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/warp_probe.py \
    "population:$dataset:clean,warp:0-6" --budgets 0.5,1 --skip-done)
done
