"""Issue 32: the mask scan with the whole graph run per channel setting (before issue 32) against the graph
cut at each layer (``fmt_audit.backends.onnxrt.suffix``: the part before the layer's mask runs once), side by
side in one run.

Per model, each engine in a fresh process on the same images and seed (the channel scan alone, no verdict:
``verdict_cost.py`` times that):

* ``whole``: the scan before issue 32 (the cut turned off);
* ``cut``: the default.

With ``--verdict``, the cut engine's scan also computes the default verdict (on its own sample of the same
data), timed apart (``verdict s``): a scan's whole cost is its ``time s`` plus that.

Reported: time, the flagged sets against the first engine's (recall: its flags also flagged; extra: flags it
did not make, as a share of its flags; both engines must give the same), and where the model has a known
trigger, ACC / ASR with only the flagged channels removed (no fine-tuning, ONNX Runtime masks).

    cd benchmarks && python cut_speed.py matrix:cifar10-preact18q-badnets-p10,cifar10-vgg-badnets-p10
    cd benchmarks && python cut_speed.py matrix:cifar10-preact18-badnets-p10 --presets cut --samples 1024 --device cuda
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

ENGINES = ("whole", "cut")
HEADER = ["model", "channels", "N", "engine", "device", "time s", "vs before", "verdict s", "flagged", "recall",
          "extra", "ACC removed", "ASR removed"]


def run_engine(engine: str, model: str, defender: str, samples: int, seed: int, mean, std, out: str,
               verdict: bool, device: str = "cpu") -> dict:
    """One engine in this process: the channel scan's seconds (and the verdict's, if asked for), and the report
    (written to ``out``)."""
    import onnxruntime  # noqa: F401  (imports are not what is timed)

    from fmt_audit.data import load_npz
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.model.loading import load_model
    from fmt_audit.verdict import VerdictConfig

    if engine == "whole":
        from fmt_audit.backends.onnxrt.masked import MaskedModel

        MaskedModel._cut_for = lambda self, layer, x: None     # the scan as it ran before the cut
    loaded = load_model(model)
    data = load_npz(defender)
    started = time.perf_counter()
    report = scan(loaded, data, ScanConfig(samples=samples, seed=seed, device=device, mean=mean, std=std),
                  verdict=VerdictConfig(seed=seed) if verdict and engine == "cut" else None)
    seconds = time.perf_counter() - started
    Path(out).write_text(report.to_json())
    verdict_s = report.timing["verdict_s"] if report.verdict is not None else None
    return {"seconds": seconds - (verdict_s or 0.0), "verdict_s": verdict_s, "device": report.config["device_used"]}


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
    parser.add_argument("--verdict", action="store_true", help="time the default verdict too (cut engine)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the scans run")
    parser.add_argument("--child", nargs=4, help=argparse_hidden())
    args = parser.parse_args()
    if args.child:
        engine, model, defender, out = args.child
        spec = json.loads(os.environ["CUT_NORM"])
        print(json.dumps(run_engine(engine, model, defender, args.samples, args.seed, spec["mean"], spec["std"],
                                    out, args.verdict, args.device)))
        return

    from fmt_audit.report.json_report import ScanReport

    rows = []
    for case in (c for name in args.models for c in cases(name)):
        base_flags = base_time = None
        for engine in args.presets.split(","):
            with tempfile.TemporaryDirectory() as folder:
                out = Path(folder) / "report.json"
                command = [sys.executable, __file__, "--child", engine, str(case.model), str(case.defender),
                           str(out), "--samples", str(args.samples), "--seed", str(args.seed),
                           "--device", args.device, *(["--verdict"] if args.verdict else [])]
                norm = json.dumps({"mean": case.mean, "std": case.std})
                done = subprocess.run(command, check=True, capture_output=True, text=True,
                                      env={**os.environ, "CUT_NORM": norm})
                timed = json.loads(done.stdout.strip().splitlines()[-1])
                seconds = timed["seconds"]
                report = ScanReport.read(out)
            flags = {(layer, c) for layer, channels in report.flagged.items() for c in channels}
            if base_flags is None:
                base_flags, base_time = flags, seconds
            acc, asr = removal(case, report.flagged) if case.triggered is not None else (None, None)
            rows.append({"model": case.label, "channels": sum(layer.channels for layer in report.layers),
                         "N": report.config["samples"], "engine": engine, "device": timed["device"],
                         "time s": round(seconds, 1),
                         "vs before": round(base_time / seconds, 2),
                         "verdict s": "–" if timed["verdict_s"] is None else round(timed["verdict_s"], 1),
                         "flagged": len(flags),
                         "recall": round(len(flags & base_flags) / len(base_flags), 3) if base_flags else "–",
                         "extra": round(len(flags - base_flags) / max(len(base_flags), 1), 3),
                         "ACC removed": None if acc is None else round(100 * acc, 1),
                         "ASR removed": None if asr is None else round(100 * asr, 1)})
            print(json.dumps(rows[-1]), flush=True)
    publish(rows, HEADER, f"cut_speed_{'_'.join(args.models)}_n{args.samples}")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
