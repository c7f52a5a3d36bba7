"""What the verdict costs: the maximum-margin test beside the sink probe and the mask-mode scan, per model.

The maximum-margin test's cost is classes x starts x steps forward and backward
passes of single images, whatever the data and the channel count; so it is timed
at a reduced effort (``--restarts``, ``--steps``) and scaled linearly to the
default's 16 x 200, which is stated beside each figure. The sink probe (64
channels, eps calibrated) and the mask-mode scan (N images) are timed as the scan
runs them. Each model in a fresh process, one after another.

    python benchmarks/verdict_cost.py sample resnet18 mobilenetv2 [--restarts 2 --steps 20] [--samples 256]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

from cases import arguments, model_paths, publish

DEFAULT_RESTARTS, DEFAULT_STEPS = 16, 200


def measure(model: str, data: str, restarts: int, steps: int, samples: int) -> dict:
    """One model's timings, in this process."""
    from fmt_audit.data import load_data
    from fmt_audit.loading import load_model
    from fmt_audit.margin import margin_test
    from fmt_audit.scan import ScanConfig, model_verdict, scan
    from fmt_audit.verdict import MarginConfig

    loaded = load_model(model)
    config = ScanConfig(samples=samples, verdict="none")
    started = time.perf_counter()
    report = scan(loaded, data, config)
    mask_s = time.perf_counter() - started
    started = time.perf_counter()
    margins, _ = margin_test(loaded.proto, loaded.image_input, config.preprocessing, "cpu",
                             MarginConfig(restarts=restarts, steps=steps))
    margin_s = time.perf_counter() - started
    dataset = load_data(data, loaded.image_input, loaded.num_classes).take(samples, seed=config.seed)
    started = time.perf_counter()
    model_verdict(loaded, dataset, replace(config, verdict="sink"), list(loaded.layers), [])
    sink_s = time.perf_counter() - started
    scale = DEFAULT_RESTARTS * DEFAULT_STEPS / (restarts * steps)
    return {"classes": len(margins), "channels": sum(layer.channels for layer in report.layers),
            "mask_scan_s": round(mask_s, 1), "sink_probe_s": round(sink_s, 1),
            "margin_measured_s": round(margin_s, 1), "margin_default_s": round(margin_s * scale, 1)}


def main() -> None:
    parser = arguments(__doc__, "", 256)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DATA"), help="measure one model in this process")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.restarts, args.steps, args.samples)))
        return
    rows = []
    for name in args.models:
        for label, model, data in model_paths(name):
            out = subprocess.run([sys.executable, __file__, "--one", str(model), str(data), "--restarts",
                                  str(args.restarts), "--steps", str(args.steps), "--samples", str(args.samples)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append({"model": label, **json.loads(out.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    header = ["model", "classes", "channels", "mask_scan_s", "sink_probe_s", "margin_measured_s", "margin_default_s"]
    publish(rows, header, f"verdict_cost_{'-'.join(args.models)}_r{args.restarts}s{args.steps}_n{args.samples}"
                          f"_threads{os.cpu_count()}")


if __name__ == "__main__":
    main()
