# Where research/ queues find the matrix cells (sourced by cpu_matrix.sh, cpu_queue.sh, stamp_queue.sh).
bench_cache="${FMT_AUDIT_BENCH_CACHE:-$HOME/.cache/fmt-audit/benchmarks}"
cpu_weights="$bench_cache/cpu-weights"   # research/cpu_matrix.sh trains each cell into cpu_weights/CELL

exported() {   # CELL: its export finished (model.onnx is renamed into place after facts.json is written)
  [ -f "$bench_cache/matrix/$1/facts.json" ] && [ -f "$bench_cache/matrix/$1/model.onnx" ]
}

training_ended() {   # CELL done|other: cpu_weights/CELL/train.json lists the cell with status done, or another
  python -c "import json, sys; sys.exit(not any(c['name'] == '$1' and (c['status'] == 'done') == ('$2' == 'done')
      for c in json.load(open('$cpu_weights/$1/train.json'))['cells']))" 2> /dev/null
}
