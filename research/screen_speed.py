"""Issue 32: the default mask scan as it was (every channel on all N images, the whole graph per setting)
against the new default (the graph cut at each layer, screen then confirm), side by side in one run.

Per model, each engine in a fresh process on the same images and seed (the channel scan alone, no verdict:
``verdict_cost.py`` times that):

* ``exact-whole``: the scan before issue 32 (``--budget exact`` with the cut turned off: the whole graph
  runs per setting);
* ``exact-cut``: every channel on all images, only the part of the graph after the layer per setting;
* ``fast-cut``: the new default (``--budget fast``).

Reported: time, channels tested on all N images, the flagged sets against the first engine's (recall:
its flags also flagged; extra: flags it did not make, as a share of its flags), and where the model has a
known trigger, ACC / ASR with only the flagged channels removed (no fine-tuning, ONNX Runtime masks).

Runs against the library of commit 5bcd48b, where ``--budget`` existed (docs/research/screening.md:
the screen lost and left the library; ``benchmarks/cut_speed.py`` is the benchmark that stayed):

    git checkout 5bcd48b -- fmt_audit && cd benchmarks && \
        PYTHONPATH=. python ../research/screen_speed.py matrix:cifar10-preact18q-badnets-p10,cifar10-vgg-badnets-p10
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cases import arguments, cases, publish

ENGINES = ("exact-whole", "exact-cut", "fast-cut")
HEADER = ["model", "channels", "N", "engine", "time s", "vs before", "confirmed on all N", "flagged", "recall",
          "extra", "ACC removed", "ASR removed"]


def run_engine(engine: str, model: str, defender: str, samples: int, seed: int, mean, std, out: str) -> dict:
    """One engine in this process: seconds and the report (written to ``out``)."""
    import onnxruntime  # noqa: F401  (imports are not what is timed)

    from fmt_audit.data import load_npz
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.model.loading import load_model

    budget, _, graph = engine.partition("-")
    if graph == "whole":
        from fmt_audit.backends.onnxrt.masked import MaskedModel

        MaskedModel._cut_for = lambda self, layer, x: None     # the scan as it ran before the cut
    loaded = load_model(model)
    data = load_npz(defender)
    started = time.perf_counter()
    report = scan(loaded, data, ScanConfig(samples=samples, seed=seed, budget=budget, device="cpu", mean=mean,
                                           std=std), verdict=None)
    seconds = time.perf_counter() - started
    Path(out).write_text(report.to_json())
    return {"seconds": seconds}


def removal(case, flagged: dict) -> tuple[float, float]:
    """ACC on the test images and ASR on the triggered ones (not of the target) with ``flagged`` removed."""
    from fmt_audit.backends.onnxrt.masked import MaskedModel
    from fmt_audit.data import Preprocessing
    from fmt_audit.model.loading import load_model

    model = MaskedModel(load_model(case.model).classifier, "cpu", Preprocessing(case.mean, case.std))
    test = case.test
    acc = float((model.predict(test.x, removed=flagged) == test.y).mean())
    others = test.y != case.target
    asr = float((model.predict(case.triggered[others], removed=flagged) == case.target).mean())
    return acc, asr


def main() -> None:
    parser = arguments(__doc__, ",".join(ENGINES), 256)
    parser.add_argument("--child", nargs=4, help=argparse_hidden())
    args = parser.parse_args()
    if args.child:
        engine, model, defender, out = args.child
        spec = json.loads(os.environ["SCREEN_NORM"])
        print(json.dumps(run_engine(engine, model, defender, args.samples, args.seed, spec["mean"], spec["std"],
                                    out)))
        return

    from fmt_audit.report.json_report import ScanReport

    rows = []
    for case in (c for name in args.models for c in cases(name)):
        base_flags = base_time = None
        for engine in args.presets.split(","):
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / "report.json"
                command = [sys.executable, __file__, "--child", engine, str(case.model), str(case.defender),
                           str(out), "--samples", str(args.samples), "--seed", str(args.seed)]
                norm = json.dumps({"mean": case.mean, "std": case.std})
                done = subprocess.run(command, check=True, capture_output=True, text=True,
                                      env={**os.environ, "SCREEN_NORM": norm})
                seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
                report = ScanReport.read(out)
            flags = {(layer, c) for layer, channels in report.flagged.items() for c in channels}
            confirmed = sum(len(layer.selection["screen"]["confirmed"]) if "screen" in layer.selection
                            else layer.channels for layer in report.layers)
            if base_flags is None:
                base_flags, base_time = flags, seconds
            acc, asr = removal(case, report.flagged) if case.triggered is not None else (None, None)
            rows.append({"model": case.label, "channels": sum(layer.channels for layer in report.layers),
                         "N": report.config["samples"], "engine": engine, "time s": round(seconds, 1),
                         "vs before": round(base_time / seconds, 2), "confirmed on all N": confirmed,
                         "flagged": len(flags),
                         "recall": round(len(flags & base_flags) / len(base_flags), 3) if base_flags else "–",
                         "extra": round(len(flags - base_flags) / max(len(base_flags), 1), 3),
                         "ACC removed": None if acc is None else round(100 * acc, 1),
                         "ASR removed": None if asr is None else round(100 * asr, 1)})
            print(json.dumps(rows[-1]), flush=True)
    publish(rows, HEADER, f"screen_speed_{'_'.join(args.models)}_n{args.samples}")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
