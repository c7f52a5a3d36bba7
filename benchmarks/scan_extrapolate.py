"""Issue 32: what a full default scan of a large model costs, from a few channels of each layer.

Every channel of a layer costs the same in the mask test (the same part of the graph after the layer's mask,
three settings, N images), so a layer's time is ``setup + channels x per_channel``: the part before the mask
and the cut's sessions once, then the rest per channel. This script times, layer by layer with the cut graph
(the default engine), the first K1 and the first K2 channels of every Conv layer on N images, fits the two
numbers per layer, and adds up ``setup + channels x per_channel`` over the layers (a layer with at most K2
channels is timed whole). ``--full`` also scans every channel of the model, to check the extrapolation on a
model small enough to scan. ``--verdict`` runs the default (`combined`) verdict, timed by stage as
`verdict_cost.py` does; ``--search-steps S`` times S of the trigger search's 300 Adam steps (every step is
the same work) and scales them, for a model whose whole verdict takes too long.

Random-weight architectures (``architectures.py``: ``resnet18`` is the full-width PreAct-ResNet-18,
``mobilenetv2`` torchvision's at width 1.0, both 32x32) time the test as well as trained ones: nothing in the
channel scan's work depends on the weights. The verdict's universal ladder stops at the first rung where one
class is reached, which does depend on them.

    cd benchmarks && python scan_extrapolate.py mobilenetv2 resnet18 --search-steps 10
    python scan_extrapolate.py matrix:gtsrb-preact18q-clean --full       # the check
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cases import model_paths, normalisation, publish

HEADER = ["model", "channels", "layers", "N", "K", "tested", "test s", "extrapolated s", "full s",
          "extrapolated / full", "verdict s", "verdict stages", "search s (300 steps, scaled)"]


def layer_times(tester, layers, k: int) -> dict[str, float]:
    """Seconds to test the first ``k`` channels of each layer (all of a smaller layer's)."""
    times = {}
    for layer in layers:
        started = time.perf_counter()
        tester.score_layer(layer, list(range(min(k, layer.out_channels))))
        times[layer.name] = time.perf_counter() - started
    return times


def extrapolate(layers, first: dict[str, float], second: dict[str, float], k1: int, k2: int) -> float:
    """The whole scan's seconds from each layer's time at ``k1`` and ``k2`` channels."""
    total = 0.0
    for layer in layers:
        if layer.out_channels <= k2:            # timed whole at k2
            total += second[layer.name]
            continue
        per_channel = max(0.0, (second[layer.name] - first[layer.name]) / (k2 - k1))
        setup = max(0.0, second[layer.name] - k2 * per_channel)
        total += setup + layer.out_channels * per_channel
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--channels", default="2,6", help="K1,K2: channels timed per layer")
    parser.add_argument("--full", action="store_true", help="also scan every channel (the extrapolation's check)")
    parser.add_argument("--verdict", action="store_true", help="time the whole default verdict by stage")
    parser.add_argument("--search-steps", type=int, default=0,
                        help="time this many of the trigger search's steps and scale them to all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    k1, k2 = (int(v) for v in args.channels.split(","))

    from verdict_cost import timed_stages

    from fmt_audit.backends.onnxrt.masked import MaskedModel
    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.data import Preprocessing, load_data
    from fmt_audit.fmt.mask import MaskTestConfig, MaskTester
    from fmt_audit.model.loading import load_model
    from fmt_audit.verdict import VerdictConfig, assess
    from fmt_audit.verdict.config import CleanseConfig
    from fmt_audit.verdict.evidence.cleanse import reverse_triggers

    rows = []
    for label, model_path, data_path in (c for name in args.models for c in model_paths(name)):
        mean, std = normalisation(Path(model_path))
        preprocessing = Preprocessing(mean, std)
        loaded = load_model(model_path)
        dataset = load_data(data_path, loaded.image_input, loaded.num_classes)
        sample = dataset.take(args.samples, seed=args.seed)
        classes = loaded.num_classes or int(dataset.y.max()) + 1
        masked = MaskedModel(loaded.classifier, "cpu", preprocessing if mean else None)
        tester = MaskTester(masked, sample.x, sample.y, classes, MaskTestConfig())
        layers = loaded.layers
        started = time.perf_counter()
        first = layer_times(tester, layers, k1)
        second = layer_times(tester, layers, k2)
        row = {"model": label, "channels": sum(layer.out_channels for layer in layers), "layers": len(layers),
               "N": args.samples, "K": f"{k1},{k2}",
               "tested": sum(min(k1, layer.out_channels) + min(k2, layer.out_channels) for layer in layers),
               "test s": round(time.perf_counter() - started, 1),
               "extrapolated s": round(extrapolate(layers, first, second, k1, k2), 1),
               "full s": "–", "extrapolated / full": "–", "verdict s": "–", "verdict stages": "–",
               "search s (300 steps, scaled)": "–",
               "per layer": [[layer.name, layer.out_channels, round(first[layer.name], 3), round(second[layer.name], 3)]
                             for layer in layers]}
        if args.full:
            started = time.perf_counter()
            layer_times(tester, layers, max(layer.out_channels for layer in layers))
            row["full s"] = round(time.perf_counter() - started, 1)
            row["extrapolated / full"] = round(row["extrapolated s"] / row["full s"], 3)
        if args.search_steps:
            classifier = BridgedClassifier(to_torch(loaded.classifier), preprocessing, "cpu")
            started = time.perf_counter()
            reverse_triggers(classifier, sample, classes, CleanseConfig(steps=args.search_steps))
            row["search s (300 steps, scaled)"] = round((time.perf_counter() - started) * 300 / args.search_steps, 1)
        if args.verdict:
            spent: dict[str, float] = {}
            timed_stages(spent)
            started = time.perf_counter()
            decided = assess(loaded, data_path, VerdictConfig(samples=args.samples), mean, std, "cpu")
            row["verdict s"] = round(time.perf_counter() - started, 1)
            row["verdict stages"] = dict(spent, verdict=decided.verdict)
        print(json.dumps(row), flush=True)
        rows.append(row)
    threads = os.environ.get("OMP_NUM_THREADS", "all")
    publish(rows, HEADER, f"scan_extrapolate_{'_'.join(args.models)}_n{args.samples}_threads{threads}")


if __name__ == "__main__":
    main()
