cd /work/main/benchmarks
for cell in cifar10-preact18q-badnets-p01 cifar10-preact18q-blended-p01 cifar10-preact18q-badnets-p05 cifar10-vgg-badnets-p01 cifar10-plaincnn-lowfreq-p10 cifar10-preact18q-inputaware-p10; do
  PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py "matrix:$cell" --tag stamp-h2h --methods "trace + stamp unlearning"
done
