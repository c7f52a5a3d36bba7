"""Issue 32: how the mask scan's cost grows with the images N and the channels tested, for both engines.

On one model, in one process, the mask test of the first K channels of every Conv layer on N images, with
the whole graph run per setting (the scan before issue 32) and with the graph cut at each layer (the
default), for every N in ``--samples-grid`` and K in ``--channels-grid``; the two engines alternate per
point, so that load on the machine falls on both alike. The model is loaded and the sessions are built
before the clock starts; a layer's cut (its two sessions and the feature maps of the N images) is built
inside it. Fitted by least squares on the logs: time = a * N^alpha * channels^beta, per engine.

    cd benchmarks && python scan_scaling.py matrix:cifar10-preact18q-clean --samples-grid 32,64,128 \\
        --channels-grid 2,4,8
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from cases import model_paths, normalisation, publish

HEADER = ["model", "engine", "N", "channels", "time s", "s per channel", "vs whole"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--samples-grid", default="32,64,128")
    parser.add_argument("--channels-grid", default="2,4,8")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from fmt_audit.backends.onnxrt.masked import MaskedModel
    from fmt_audit.data import Preprocessing, load_npz
    from fmt_audit.fmt.mask import MaskTestConfig, MaskTester
    from fmt_audit.model.loading import load_model

    rows, fits = [], []
    grid_n = [int(v) for v in args.samples_grid.split(",")]
    grid_k = [int(v) for v in args.channels_grid.split(",")]
    for label, model_path, data_path in (c for name in args.models for c in model_paths(name)):
        mean, std = normalisation(model_path)
        preprocessing = Preprocessing(mean, std) if mean else None
        loaded = load_model(model_path)
        data = load_npz(data_path)
        engines = {"whole": MaskedModel(loaded.classifier, "cpu", preprocessing),
                   "cut": MaskedModel(loaded.classifier, "cpu", preprocessing)}
        engines["whole"]._cut_for = lambda layer, x: None       # the scan before the cut
        points: dict[str, list[tuple[int, int, float]]] = {"whole": [], "cut": []}
        for n in grid_n:
            sample = data.take(n, seed=args.seed)
            for k in grid_k:
                channels = {layer.name: list(range(min(k, layer.out_channels))) for layer in loaded.layers}
                tested = sum(map(len, channels.values()))
                timed = {}
                for engine, model in engines.items():
                    tester = MaskTester(model, sample.x, sample.y, loaded.num_classes or int(data.y.max()) + 1,
                                        MaskTestConfig())
                    started = time.perf_counter()
                    for layer in loaded.layers:
                        tester.score_layer(layer, channels[layer.name])
                    timed[engine] = time.perf_counter() - started
                    points[engine].append((n, tested, timed[engine]))
                for engine, seconds in timed.items():
                    rows.append({"model": label, "engine": engine, "N": n, "channels": tested,
                                 "time s": round(seconds, 2), "s per channel": round(seconds / tested, 4),
                                 "vs whole": round(timed["whole"] / seconds, 2)})
                    print(json.dumps(rows[-1]), flush=True)
        for engine, values in points.items():
            table = np.asarray(values, dtype=float)
            design = np.column_stack([np.ones(len(table)), np.log(table[:, 0]), np.log(table[:, 1])])
            (log_a, alpha, beta), *_ = np.linalg.lstsq(design, np.log(table[:, 2]), rcond=None)
            fits.append({"model": label, "engine": engine, "alpha (N)": round(float(alpha), 3),
                         "beta (channels)": round(float(beta), 3), "a": float(np.exp(log_a))})
    publish(rows, HEADER, f"scan_scaling_{'_'.join(args.models)}_threads{os.environ.get('OMP_NUM_THREADS', 'all')}")
    print("| model | engine | time ~ N^alpha | channels^beta |\n|---|---|---|---|")
    for fit in fits:
        print(f"| {fit['model']} | {fit['engine']} | {fit['alpha (N)']} | {fit['beta (channels)']} |")


if __name__ == "__main__":
    main()
