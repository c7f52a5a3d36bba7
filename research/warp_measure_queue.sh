#!/bin/bash
# docs/research/verdict-warp.md's measurement, cheapest models first; resumable (rows already there are skipped).
# From the warp-evidence worktree with the project's environment active; the matrix cells are trained by
# research/cpu_matrix.sh where missing.
#   bash research/warp_measure_queue.sh [populations|vgg]   (both parts by default; the parts can run side by side)
. "$(dirname "$0")/matrix_state.sh"
here="$(cd "$(dirname "$0")" && pwd)"
run() { (cd "$here/../benchmarks" && PYTHONPATH="$here/..:.:$here" OMP_NUM_THREADS=1 python "$here/warp_measure.py" "$@"); }
part="${1:-all}"
if [ "$part" != vgg ]; then
for dataset in digits mnist; do
  run "population:$dataset:clean,warp:6-12" "population:$dataset:badnets,blended,sig:6-9"
done
for cell in mnist-lenet-wanet-p10-r4 mnist-lenet-wanet-p10-r5 mnist-lenet-clean-r4 mnist-lenet-clean-r5 \
    gtsrb-preact18q-wanet-p10-r1 gtsrb-preact18q-clean-r1; do
  exported "$cell" || bash "$here/cpu_matrix.sh" "$cell"
  run "matrix:$cell"
done
run population:cifar10:clean,warp:6-12 population:cifar10:badnets,blended,sig:6-9
fi
[ "$part" = populations ] && exit 0
for cell in cifar10-vgg-wanet-p10 cifar10-vgg-clean; do
  exported "$cell" || bash "$here/cpu_matrix.sh" "$cell"
  run "matrix:$cell"
done
