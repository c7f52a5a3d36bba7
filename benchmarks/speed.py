"""How fast is a scan? The project's scan against the per-channel loop of the public reference code.

Times, in one run, on the same model, data and seed:

* ``reference loop``: what the public reference does — per Conv layer one forward
  pass of the random-start batch with the graph kept, then per channel one
  ``autograd.grad`` of that channel's feature-map MSE (``retain_graph=True``) and
  two full forward passes for the alpha / 2*alpha candidates;
* ``fmt-audit gradient``: the project's gradient mode with the same settings
  (eps 0.06, alpha 0.02, one step: the ``paper`` preset's test);
* ``fmt-audit mask``: the forward-only mask mode (a different test: its time is
  listed, its scores are not comparable).

The gradient rows must agree channel for channel: the script checks that the
per-channel accuracies are identical and reports the largest difference.

    python benchmarks/speed.py sample --samples 256

Prints a Markdown table and writes the rows to ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import resource
import time

import numpy as np
from cases import arguments, model_paths, publish

HEADER = ["model", "channels", "N", "device", "method", "time s", "feature maps/s", "speed-up", "max |Δ acc|",
          "peak RSS MiB"]


def reference_loop(bridge, x: np.ndarray, y: np.ndarray, layers, eps: float, alpha: float, seed: int) -> np.ndarray:
    """Per-channel accuracies [C_total, 2], computed one channel at a time as the reference code does."""
    import torch

    from fmt_audit.testing import random_start

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
        for channel in range(layer.out_channels):
            loss = torch.nn.functional.mse_loss(feature[:, channel], reference[:, channel])
            (grad,) = torch.autograd.grad(loss, x0, retain_graph=True)
            scores = []
            for size in (alpha, 2 * alpha):
                candidate = torch.minimum(torch.maximum(x0.detach() + size * grad.sign(), lower), upper)
                with torch.no_grad():
                    scores.append(float((module(candidate).argmax(1) == labels).float().mean()))
            rows.append(scores)
    return np.asarray(rows)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    # methods: gradient (candidates in ONNX Runtime), gradient-torch (in the torch module), mask
    parser = arguments(__doc__, "gradient,gradient-torch,mask", 256)
    args = parser.parse_args()

    from fmt_audit.bridge import to_torch
    from fmt_audit.data import load_npz
    from fmt_audit.loading import load_model
    from fmt_audit.scan import ScanConfig, scan

    rows = []
    for label, model_path, defender in (c for n in args.models for c in model_paths(n)):
        loaded = load_model(model_path)
        data = load_npz(defender).take(args.samples, seed=args.seed)
        channels = sum(layer.out_channels for layer in loaded.layers)
        base = {"model": label, "channels": channels, "N": len(data), "device": "cpu"}
        started = time.perf_counter()
        expected = reference_loop(to_torch(loaded.proto), data.x, data.y, loaded.layers, 0.06, 0.02, args.seed)
        baseline = time.perf_counter() - started
        rows.append({**base, "method": "reference loop", "time s": round(baseline, 2),
                     "feature maps/s": round(channels / baseline, 1), "speed-up": 1.0, "max |Δ acc|": 0.0,
                     "peak RSS MiB": round(peak_rss_mib())})
        print(json.dumps(rows[-1]), flush=True)
        for method in args.presets.split(","):
            mode, _, predict_with = method.partition("-")
            config = ScanConfig.from_preset("paper", mode=mode, samples=len(data), seed=args.seed, device="cpu",
                                            predict_with=predict_with or "onnxruntime")
            started = time.perf_counter()
            report = scan(loaded, data, config)
            seconds = time.perf_counter() - started
            difference = "-"
            if mode == "gradient":
                got = np.concatenate([np.asarray(layer.scores) for layer in report.layers])
                difference = float(np.abs(got - expected).max())
            rows.append({**base, "method": f"fmt-audit {method}", "time s": round(seconds, 2),
                         "feature maps/s": round(channels / seconds, 1), "speed-up": round(baseline / seconds, 1),
                         "max |Δ acc|": difference, "peak RSS MiB": round(peak_rss_mib())})
            print(json.dumps(rows[-1]), flush=True)
    publish(rows, HEADER, f"speed_{'_'.join(args.models)}_n{args.samples}_threads{os.cpu_count()}")


if __name__ == "__main__":
    main()
