#!/bin/bash
# docs/research/verdict-twins.md: new clean twins trained on the CPU (research/cpu_matrix.sh), then the default
# verdict on each (benchmarks/verdict_matrix.py's `cell`: 256 of the cell's 2,000 defender images, seed 0, a fresh
# process), rows appended to research/results/verdict_twins.jsonl as they come. Resumable: a trained cell is not
# trained again, a cell with a row is skipped. One thread; from the project root with its environment active:
#   bash research/twins_queue.sh mnist-lenet-clean-r6 mnist-lenet-clean-r7 ...
#   python research/verdict_twins.py
root="$(cd "$(dirname "$0")/.." && pwd)"
rows="$root/research/results/verdict_twins.jsonl"
cache="${FMT_AUDIT_BENCH_CACHE:-$HOME/.cache/fmt-audit/benchmarks}/matrix"
for cell in "$@"; do
  grep -q "\"cell\": \"$cell\"" "$rows" 2>/dev/null && { echo "$cell: done"; continue; }
  OMP_NUM_THREADS=1 bash "$root/research/cpu_matrix.sh" "$cell"
  [ -f "$cache/$cell/model.onnx" ] || { echo "$cell: not exported" >&2; continue; }
  row=$(cd "$root/benchmarks" && PYTHONPATH=..:. OMP_NUM_THREADS=1 python verdict_matrix.py cell "$cache/$cell" | tail -n 1)
  [ -n "$row" ] && echo "$row" >> "$rows" && echo "$row"
done
