"""A graph fixed to batch size 1 (torch's default export) in the mask scan: freed for ONNX Runtime
(``fmt_audit.backends.onnxrt.session.with_free_batch``) against run as exported, one image per call.

Side by side in one run, ``--repeats`` times each, on the last ``--layers`` Conv layers of the legacy-torch
MobileNetV3 fixture (tests/fixtures/exporters/), N images: median seconds, the ratio, and whether the
scores are identical.

    python benchmarks/fixed_batch.py --layers 8 --samples 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np

FIXTURE = (Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "exporters"
           / "torchlegacy_mobilenetv3small_w05_op9_initinputs.onnx")
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import os

    import fmt_audit.backends.onnxrt.masked as masked
    from fmt_audit.data import Dataset
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.model.loading import load_model

    loaded = load_model(FIXTURE)
    names = [layer.name for layer in loaded.layers]
    skip = "^(" + "|".join(map(re.escape, names[:-args.layers])) + ")$"
    rng = np.random.default_rng(0)
    data = Dataset(rng.random((args.samples, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, args.samples))
    config = ScanConfig(samples=args.samples, skip_layers=skip)
    freeing = masked.with_free_batch
    times: dict[str, list[float]] = {"freed": [], "as exported": []}
    scores = {}
    for _ in range(args.repeats):
        for label, free in (("freed", freeing), ("as exported", lambda model: model)):
            masked.with_free_batch = free
            started = time.perf_counter()
            report = scan(loaded, data, config, verdict=None)
            times[label].append(time.perf_counter() - started)
            scores[label] = [layer.scores for layer in report.layers]
    masked.with_free_batch = freeing
    medians = {label: round(statistics.median(values), 2) for label, values in times.items()}
    row = {"model": FIXTURE.name, "layers": args.layers, "channels": sum(layer.channels for layer in report.layers),
           "samples": args.samples, "repeats": args.repeats, "median_s": medians,
           "ratio": round(medians["as exported"] / medians["freed"], 2),
           "same_scores": scores["freed"] == scores["as exported"], "threads": os.environ.get("OMP_NUM_THREADS")}
    print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"fixed_batch_l{args.layers}_n{args.samples}.json").write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
