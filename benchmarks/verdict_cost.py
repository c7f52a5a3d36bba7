"""What the verdict costs: each shipped verdict method (the registry's) beside the channel scan, per model.

Each model in a fresh process, one after another, on an otherwise idle machine: the channel scan without a
verdict, then every method of :data:`fmt_audit.verdict.METHODS` through :func:`fmt_audit.verdict.assess` at
its defaults (the conversion to PyTorch included in each, as a scan that asks for one verdict pays it), with
the `combined` verdict's time split by its stages (`combined_stages`: the trigger search, the universal
ladder, the references' training and the transfer to them, the smooth images; the rest is the conversion),
and `combined` again with its reference networks read from a `ReferenceCache` folder that the first run
filled (`combined_cached_s`: what a second audit on the same images pays, `--cache`).

    python benchmarks/verdict_cost.py sample resnet18 mobilenetv2 [--samples 256]
    python benchmarks/verdict_cost.py matrix:cifar10-preact18q-badnets-p10 --combined-only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cases import arguments, model_paths, normalisation, publish

from fmt_audit.verdict import METHODS

# the combined verdict's stages: (module, function) -> the name its time is filed under
STAGES = {("fmt_audit.verdict.evidence.cleanse", "reverse_triggers"): "trigger search",
          ("fmt_audit.verdict.evidence.universal", "universal_ladder"): "universal ladder",
          ("fmt_audit.verdict.evidence.transfer", "transfer_to_references"): "references and transfer",
          ("fmt_audit.verdict.evidence.smooth", "smooth_shares"): "smooth images"}


def timed_stages(spent: dict[str, float]):
    """Wrap each stage's function (looked up at call time by ``combined``) to add its seconds to ``spent``."""
    import importlib

    def wrap(function, name):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = round(spent.get(name, 0.0) + time.perf_counter() - started, 1)
        return timed

    for (module, function), name in STAGES.items():
        loaded = importlib.import_module(module)
        setattr(loaded, function, wrap(getattr(loaded, function), name))


def measure(model: str, data: str, samples: int, combined_only: bool = False) -> dict:
    """One model's timings, in this process (``combined_only``: no scan, no other method)."""
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.model.loading import load_model
    from fmt_audit.verdict import VerdictConfig, assess

    loaded = load_model(model)
    mean, std = normalisation(Path(model))      # a matrix cell may expect normalisation outside its graph
    config = ScanConfig(samples=samples, mean=mean, std=std)
    row = {"channels": sum(layer.out_channels for layer in loaded.layers)}
    if not combined_only:
        started = time.perf_counter()
        scan(loaded, data, config, verdict=None)
        row["scan_s"] = round(time.perf_counter() - started, 1)
    from fmt_audit.verdict.evidence.transfer import ReferenceCache

    spent: dict[str, float] = {}
    timed_stages(spent)
    verdicts = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ["combined"] if combined_only else METHODS:
            spent.clear()
            started = time.perf_counter()
            verdict = assess(loaded, data, VerdictConfig(method=name, samples=samples), config.mean, config.std,
                             "cpu", references=ReferenceCache(folder=folder))
            row[f"{name}_s"] = round(time.perf_counter() - started, 1)
            row[f"{name}_verdict"], verdicts[name] = verdict.verdict, verdict
            if name == "combined":
                row["combined_stages"] = dict(spent)
        started = time.perf_counter()      # a fresh cache on the folder the combined run filled: another process
        again = assess(loaded, data, VerdictConfig(samples=samples), config.mean, config.std, "cpu",
                       references=ReferenceCache(folder=folder))
        row["combined_cached_s"] = round(time.perf_counter() - started, 1)
        row["combined_cached_same"] = again.to_dict() == verdicts["combined"].to_dict()
    return row


def main() -> None:
    parser = arguments(__doc__, "", 256)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DATA"), help="measure one model in this process")
    parser.add_argument("--combined-only", action="store_true",
                        help="the combined verdict's stages and its cached rerun only (no scan, no other method)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.samples, args.combined_only)))
        return
    rows = []
    for name in args.models:
        for label, model, data in model_paths(name):
            out = subprocess.run([sys.executable, __file__, "--one", str(model), str(data), "--samples",
                                  str(args.samples), *(["--combined-only"] if args.combined_only else [])],
                                 capture_output=True, text=True, check=True).stdout
            rows.append({"model": label, **json.loads(out.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    header = ["model", "channels", "scan_s", *[f"{name}_{what}" for name in METHODS for what in ("s", "verdict")],
              "combined_cached_s", "combined_cached_same"]
    if args.combined_only:
        header = ["model", "channels", "combined_s", "combined_verdict", "combined_cached_s", "combined_cached_same"]
    threads = os.environ.get("OMP_NUM_THREADS", os.cpu_count())
    publish(rows, header, f"verdict_cost_{'-'.join(args.models)}_n{args.samples}_threads{threads}"
                          f"{'_combined' if args.combined_only else ''}")


if __name__ == "__main__":
    main()
