"""How fast is a scan? The project's scan against the per-channel loop of the public reference code.

Times, on the same model, data and seed, each method in a fresh process (so that
its peak memory is its own):

* ``reference loop``: what the public reference does — per Conv layer one forward
  pass of the random-start batch with the graph kept, then per channel one
  ``autograd.grad`` of that channel's feature-map MSE (``retain_graph=True``) and
  two full forward passes for the alpha / 2*alpha candidates;
* ``gradient``: the project's gradient mode with the same settings (eps 0.06,
  alpha 0.02, one step: the ``paper`` preset's test), candidates in ONNX Runtime;
  ``gradient-torch``: candidates in the torch module;
* ``mask``: the forward-only mask mode (a different test: its time is listed,
  its scores are not comparable).

The gradient rows must agree channel for channel with the loop: the script
reports the largest difference in per-channel accuracy. ``--channels-per-layer
K`` times the first K channels of every layer (for models whose full scan takes
hours here); the gradient rows then run the scan's engine on those channels,
built as ``scan`` builds it.

The FLOP bound: the dense work testing cannot avoid (``fmt_audit.fmt.memory.scan_flops``:
two candidate forward passes and one backward pass to the input per channel,
two forward passes to each layer) divided by this machine's measured dense
throughput (fp32 matrix product, median of 10); ``of bound`` is that time over
the measured time.

    python benchmarks/speed.py sample --samples 256
    python benchmarks/speed.py resnet18 --samples 256 --channels-per-layer 2 --presets gradient

Prints a Markdown table and writes the rows to ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cases import arguments, model_paths, publish

HEADER = ["model", "channels", "N", "device", "method", "time s", "feature maps/s", "vs loop", "max |Δ acc|",
          "work GFLOP", "of FLOP bound", "peak RSS MiB"]


def reference_loop(bridge, x: np.ndarray, y: np.ndarray, layers, channels: dict[str, list[int]], eps: float,
                   alpha: float, seed: int) -> np.ndarray:
    """Per-channel accuracies [channels, 2], computed one channel at a time as the reference code does."""
    import torch

    from fmt_audit.fmt.gradient import random_start

    module = bridge.module.eval()
    clean = torch.from_numpy(x)
    start = torch.from_numpy(random_start(x, alpha, seed))
    lower, upper = (clean - eps).clamp(0, 1), (clean + eps).clamp(0, 1)
    labels = torch.from_numpy(y)
    rows = []
    for layer in layers:
        captured: dict = {}
        handle = bridge.conv_modules[layer.name].register_forward_hook(
            lambda _m, _i, output, store=captured: store.__setitem__("feature", output))
        with torch.no_grad():
            module(clean)
        reference = captured["feature"].detach()
        x0 = start.clone().requires_grad_(True)
        module(x0)
        feature = captured["feature"]
        handle.remove()
        for channel in channels[layer.name]:
            loss = torch.nn.functional.mse_loss(feature[:, channel], reference[:, channel])
            (grad,) = torch.autograd.grad(loss, x0, retain_graph=True)
            scores = []
            for size in (alpha, 2 * alpha):
                candidate = torch.minimum(torch.maximum(x0.detach() + size * grad.sign(), lower), upper)
                with torch.no_grad():
                    scores.append(float((module(candidate).argmax(1) == labels).float().mean()))
            rows.append(scores)
    return np.asarray(rows)


def engine_scores(loaded, data, config, channels: dict[str, list[int]]) -> np.ndarray:
    """The scan's gradient engine, built as ``scan`` builds it, on the given channels only."""
    from fmt_audit.backends.onnxrt.session import OrtClassifier
    from fmt_audit.backends.torch.bridge import to_torch
    from fmt_audit.fmt.gradient import FeatureMapTester, GradientTestConfig
    from fmt_audit.fmt.scan import memory_plan

    plan = memory_plan(loaded, data, config, list(loaded.layers))
    predictor = None
    if config.predict_with == "onnxruntime":
        predictor = OrtClassifier(loaded.proto, "cpu", config.preprocessing, plan.predict_batch).predict
    settings = GradientTestConfig(config.eps, config.alpha, config.steps, config.seed, plan.candidate_batch,
                                  plan.gradient_batch, plan.predict_batch)
    tester = FeatureMapTester(to_torch(loaded.proto), data.x, data.y, loaded.num_classes or 10,
                              config.preprocessing, settings, "cpu", predictor=predictor)
    return np.concatenate([tester.score_layer(layer, channels[layer.name]).accuracy for layer in loaded.layers])


def run_method(method: str, model_path: str, data_path: str, samples: int, seed: int, per_layer: int,
               scores_out: str) -> dict:
    """One method in this process: seconds and peak RSS; the per-channel accuracies go to ``scores_out``."""
    import onnx2torch  # noqa: F401  (imports are not what is timed: both methods need these)
    import onnxruntime  # noqa: F401

    from fmt_audit.backends.torch.bridge import to_torch
    from fmt_audit.data import load_npz
    from fmt_audit.fmt.memory import peak_memory_mib
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.model.loading import load_model

    loaded = load_model(model_path)
    data = load_npz(data_path).take(samples, seed=seed)
    channels = selected_channels(loaded.layers, per_layer)
    started = time.perf_counter()
    scores = None
    if method == "reference loop":
        scores = reference_loop(to_torch(loaded.proto), data.x, data.y, loaded.layers, channels, 0.06, 0.02, seed)
    else:
        mode, _, predict_with = method.partition("-")
        config = ScanConfig.from_preset("paper", mode=mode, samples=len(data), seed=seed, device="cpu",
                                        predict_with=predict_with or "onnxruntime")
        if per_layer and mode == "gradient":
            scores = engine_scores(loaded, data, config, channels)
        elif per_layer:
            raise SystemExit("--channels-per-layer times gradient mode only")
        else:
            report = scan(loaded, data, config, verdict=None)   # the channel scan; the verdict: verdict_cost.py
            if mode == "gradient":
                scores = np.concatenate([np.asarray(layer.scores) for layer in report.layers])
    seconds = time.perf_counter() - started
    if scores is not None:
        np.save(scores_out, scores)
    return {"seconds": seconds, **peak_memory_mib()}


def selected_channels(layers, per_layer: int) -> dict[str, list[int]]:
    return {layer.name: list(range(layer.out_channels if not per_layer else min(per_layer, layer.out_channels)))
            for layer in layers}


def dense_gflops() -> float:
    """This machine's fp32 matrix-product throughput with torch's default threads, GFLOP/s."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * 2048**3 / float(np.median(times)) / 1e9


def main() -> None:
    parser = arguments(__doc__, "gradient,gradient-torch,mask", 256)
    parser.add_argument("--channels-per-layer", type=int, default=0, help="time the first K channels of each layer")
    parser.add_argument("--child", nargs=3, help=argparse_hidden())
    args = parser.parse_args()
    if args.child:   # one method in a fresh process
        method, model, data = args.child
        print(json.dumps(run_method(method, model, data, args.samples, args.seed, args.channels_per_layer,
                                    os.environ["SPEED_SCORES"])))
        return

    from fmt_audit.data import load_npz
    from fmt_audit.fmt.memory import graph_cost, scan_flops
    from fmt_audit.model.loading import load_model

    throughput = dense_gflops()
    print(f"dense fp32 throughput: {throughput:.0f} GFLOP/s", flush=True)
    rows = []
    for label, model_path, data_path in (c for n in args.models for c in model_paths(n)):
        loaded = load_model(model_path)
        n = len(load_npz(data_path).take(args.samples, seed=args.seed))
        channels = selected_channels(loaded.layers, args.channels_per_layer)
        tested = sum(map(len, channels.values()))
        total = sum(layer.out_channels for layer in loaded.layers)
        cost = graph_cost(loaded.proto, *load_npz(data_path).x.shape[2:])
        work = scan_flops(cost, [(layer.name, layer.out_channels, len(channels[layer.name]))
                                 for layer in loaded.layers], n)
        base = {"model": label, "channels": f"{tested:,}" + ("" if tested == total else f" of {total:,}"), "N": n,
                "device": "cpu", "work GFLOP": round(work / 1e9)}
        expected = baseline = None
        for method in ["reference loop", *args.presets.split(",")]:
            with tempfile.TemporaryDirectory() as folder:
                scores_path = Path(folder) / "scores.npy"
                command = [sys.executable, __file__, "--child", method, str(model_path), str(data_path),
                           "--samples", str(args.samples), "--seed", str(args.seed),
                           "--channels-per-layer", str(args.channels_per_layer)]
                done = subprocess.run(command, check=True, capture_output=True, text=True,
                                      env={**os.environ, "SPEED_SCORES": str(scores_path)})
                result = json.loads(done.stdout.strip().splitlines()[-1])
                scores = np.load(scores_path) if scores_path.exists() else None
            seconds = result["seconds"]
            if method == "reference loop":
                expected, baseline = scores, seconds
            difference = "–" if scores is None else float(np.abs(scores - expected).max())
            rows.append({**base, "method": method, "time s": round(seconds, 2),
                         "feature maps/s": round(tested / seconds, 1), "vs loop": round(baseline / seconds, 2),
                         "max |Δ acc|": difference,
                         "of FLOP bound": "–" if method == "mask" else f"{work / 1e9 / throughput / seconds:.0%}",
                         "peak RSS MiB": round(result["peak_rss_mib"])})
            print(json.dumps(rows[-1]), flush=True)
    suffix = f"_k{args.channels_per_layer}" if args.channels_per_layer else ""
    after = dense_gflops()
    if after > throughput * 1.1:
        print(f"warning: dense throughput rose to {after:.0f} GFLOP/s during the run (was something else "
              "running at the start?); the 'of FLOP bound' column used the first figure", flush=True)
    publish(rows, HEADER, f"speed_{'_'.join(args.models)}_n{args.samples}{suffix}_threads{os.cpu_count()}")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
