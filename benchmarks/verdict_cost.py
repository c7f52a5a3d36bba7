"""What the verdict costs: each shipped verdict method (the registry's) beside the channel scan, per model.

Each model in a fresh process, one after another, on an otherwise idle machine: the channel scan without a
verdict, then every method of :data:`fmt_audit.verdict.METHODS` through :func:`fmt_audit.verdict.assess` at
its defaults (the conversion to PyTorch included in each, as a scan that asks for one verdict pays it).

    python benchmarks/verdict_cost.py sample resnet18 mobilenetv2 [--samples 256]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from cases import arguments, model_paths, publish

from fmt_audit.verdict import METHODS


def measure(model: str, data: str, samples: int) -> dict:
    """One model's timings, in this process."""
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.model.loading import load_model
    from fmt_audit.verdict import VerdictConfig, assess

    loaded = load_model(model)
    config = ScanConfig(samples=samples)
    started = time.perf_counter()
    report = scan(loaded, data, config, verdict=None)
    row = {"channels": sum(layer.channels for layer in report.layers),
           "scan_s": round(time.perf_counter() - started, 1)}
    for name in METHODS:
        started = time.perf_counter()
        verdict = assess(loaded, data, VerdictConfig(method=name, samples=samples), config.mean, config.std, "cpu")
        row[f"{name}_s"] = round(time.perf_counter() - started, 1)
        row[f"{name}_verdict"] = verdict.verdict
    return row


def main() -> None:
    parser = arguments(__doc__, "", 256)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DATA"), help="measure one model in this process")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.samples)))
        return
    rows = []
    for name in args.models:
        for label, model, data in model_paths(name):
            out = subprocess.run([sys.executable, __file__, "--one", str(model), str(data), "--samples",
                                  str(args.samples)], capture_output=True, text=True, check=True).stdout
            rows.append({"model": label, **json.loads(out.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    header = ["model", "channels", "scan_s", *[f"{name}_{what}" for name in METHODS for what in ("s", "verdict")]]
    publish(rows, header, f"verdict_cost_{'-'.join(args.models)}_n{args.samples}_threads{os.cpu_count()}")


if __name__ == "__main__":
    main()
