"""Issue 32: the least time an exact mask scan can take on this machine, from the graph's FLOPs and the
machine's dense fp32 throughput, next to the issue's targets.

The mask scan's flagged set comes from every channel's three settings (removed, amplified, inverted) on all
N images. With the graph cut at each layer (the default engine), a layer costs one pass of its prefix (the
graph up to its Conv) over the N images, then per channel 3 x N passes of the rest of the graph. Counting
the dense FLOPs of that (Conv, Gemm, MatMul: ``fmt_audit.fmt.memory.graph_cost``) and dividing by the
machine's fp32 matrix-product throughput (torch, 2048x2048, its default threads) gives a floor no engine
that runs the rest of the graph per setting beats on this CPU: real Convs on 32x32 maps run well below a
large matrix product's rate. (An engine that propagated only what a setting changes, layer by layer, could
do less work; none exists here.)

    cd benchmarks && python scan_floor.py \
        matrix:cifar10-preact18q-badnets-p10,cifar10-preact18-badnets-p10,cifar10-mobilenetv2-badnets-p10
"""

from __future__ import annotations

import json

from cases import arguments, model_paths, publish

SETTINGS = 3


def exact_work(cost, layers, samples: int) -> tuple[int, int]:
    """Dense FLOPs of an exact mask scan of ``layers`` (``(name, out_channels)``) on ``samples`` images:
    (the graph cut at each layer, the whole graph per setting)."""
    total = cost.total_flops
    cut = whole = 0
    for name, channels in layers:
        prefix = cost.flops_to(name)
        cut += samples * (prefix + channels * SETTINGS * (total - prefix))
        whole += samples * channels * SETTINGS * total
    return cut, whole


def main() -> None:
    parser = arguments(__doc__, "", 256)
    args = parser.parse_args()

    from speed import dense_gflops

    from fmt_audit.data import load_npz
    from fmt_audit.fmt.memory import graph_cost
    from fmt_audit.model.loading import load_model

    throughput = dense_gflops()
    print(f"dense fp32 throughput: {throughput:.0f} GFLOP/s", flush=True)
    rows = []
    for label, model_path, data_path in (c for n in args.models for c in model_paths(n)):
        loaded = load_model(model_path)
        size = load_npz(data_path).x.shape[2:]
        cost = graph_cost(loaded.proto, *size)
        layers = [(layer.name, layer.out_channels) for layer in loaded.layers]
        cut, whole = exact_work(cost, layers, args.samples)
        rows.append({"model": label, "channels": sum(c for _, c in layers), "N": args.samples,
                     "MFLOP/image": round(cost.total_flops / 1e6, 1), "whole TFLOP": round(whole / 1e12, 1),
                     "cut TFLOP": round(cut / 1e12, 1), "cut / whole": round(cut / whole, 3),
                     "GFLOP/s": round(throughput), "floor s (cut)": round(cut / 1e9 / throughput, 1)})
        print(json.dumps(rows[-1]), flush=True)
    which = "matrix" if all(m.startswith("matrix:") for m in args.models) else "_".join(args.models)
    publish(rows, list(rows[0]), f"scan_floor_{which}_n{args.samples}")


if __name__ == "__main__":
    main()
