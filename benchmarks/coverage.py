"""Architecture x exporter coverage (issue 9): full-size torchvision networks through every exporter.

For each case of ``sample_models/zoo.py`` — resnet18, vgg11_bn, mobilenet_v2,
efficientnet_b0, shufflenet_v2_x1_0, densenet121 and googlenet with seeded random
weights, through torch's legacy exporter (opsets 11, 13, 17) and its dynamo
exporter (external data), plus the hand-built graphs — runs what a user runs:
``inspect``, ``scan`` (mask mode, small N, no verdict: its cost is benchmarks/verdict_cost.py's) and ``repair``
(one epoch), then checks that ONNX Runtime and torch agree on the repaired model
and that the write-back kept the graph's structure. A case that fails records
why, in one line, and the others go on.

Exports are cached in ``~/.cache/fmt-audit/benchmarks/coverage``; the table goes
to stdout and ``benchmarks/results/coverage.json`` (README, "Coverage").

    python benchmarks/coverage.py [--families resnet,vgg] [--exporters legacy-13,dynamo] [--samples 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import onnx
from cases import CACHE, publish

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_models"))
import zoo

COVERAGE = CACHE / "coverage"
RESULTS = Path(__file__).resolve().parent / "results" / "coverage.json"
HEADER = ["architecture", "exporter", "input", "works", "why not", "conv layers", "channels", "depthwise",
          "1x1 maps", "export s", "scan s", "repair s", "ORT vs torch", "structure kept"]


def run_case(row: dict, path, samples: int, scan_too: bool = True) -> None:
    """Fill ``row`` with what inspect, scan and repair of the model at ``path`` give."""
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.model.inspection import summarize
    from fmt_audit.model.loading import load_model
    from fmt_audit.repair.config import FineTuneConfig
    from fmt_audit.repair.pipeline import RepairConfig, repair

    loaded = load_model(path)
    conv = summarize(loaded).to_dict()["conv"]
    row.update({"conv layers": conv["layers"], "channels": conv["channels"], "depthwise": conv["depthwise"],
                "1x1 maps": conv["one_by_one_maps"]})
    data = zoo.own_labels(loaded, 16)
    config = ScanConfig(samples=samples)
    flagged = {loaded.layers[0].name: [0]}      # without a scan: one channel removed, to exercise the write-back
    if scan_too:
        started = time.perf_counter()
        flagged = scan(loaded, data, config, verdict=None)
        row["scan s"] = round(time.perf_counter() - started, 1)
    else:
        row["scan s"] = "not run"
    started = time.perf_counter()
    # without a scan, the unlearning eps is fixed (its calibration is a gradient scan of 32 channels)
    settings = RepairConfig(fine_tune=FineTuneConfig(epochs=1, batch_size=8),
                            unlearn_eps="auto" if scan_too else 0.06)
    result = repair(loaded, data, settings, config, flagged=flagged)
    row["repair s"] = round(time.perf_counter() - started, 1)
    check = result.report.verification
    row["ORT vs torch"] = f"{check['max_abs_logit_difference']:.1e} <= {check['allowed']:.0e}"
    original = onnx.load(str(path))
    row["structure kept"] = zoo.structure(result.model, original) == zoo.structure(original, original)
    row["works"] = "yes" if row["structure kept"] else "no"
    if not row["structure kept"]:
        row["why not"] = "the write-back changed the graph's structure"


def merged(rows: list[dict]) -> list[dict]:
    """``rows`` over the rows of earlier runs in ``results/coverage.json`` (same architecture and exporter:
    the new row), in a stable order; runs of a few cases thus build up one table."""
    saved = RESULTS.read_text() if RESULTS.exists() else "[]"
    table = {(r["architecture"], r["exporter"]): r for r in [*json.loads(saved), *rows]}
    order = [family.full_name for family in zoo.FAMILIES.values()] + list(zoo.GRAPHS)
    return sorted(table.values(), key=lambda r: (order.index(r["architecture"]) if r["architecture"] in order
                                                  else len(order), r["exporter"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(zoo.FAMILIES))
    parser.add_argument("--exporters", default=",".join(zoo.EXPORTERS))
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="also the hand-built graphs")
    parser.add_argument("--samples", type=int, default=4, help="scan images (N)")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-scan: inspect and repair only (one channel removed), for cases too slow to scan")
    args = parser.parse_args()
    from fmt_audit.errors import first_line

    COVERAGE.mkdir(parents=True, exist_ok=True)
    cases = [(family, exporter) for family in args.families.split(",") for exporter in args.exporters.split(",")]
    cases += [("graph", name) for name in zoo.GRAPHS] if args.graphs else []
    rows = []
    for kind, name in cases:
        row = {h: "–" for h in HEADER} | {"architecture": zoo.FAMILIES[kind].full_name if kind != "graph"
                                          else name, "exporter": name if kind != "graph" else "hand-built"}
        path = COVERAGE / f"{kind}_{name}.onnx"
        try:
            started = time.perf_counter()
            if kind == "graph":
                row["input"] = "3x32x32"
                onnx.save(zoo.GRAPHS[name](), str(path))
            else:
                pixels = zoo.FAMILIES[kind].input_size("full", name)
                row["input"] = f"3x{pixels}x{pixels}"
                if not path.exists():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        zoo.export(zoo.network(kind, "full"), name, path, pixels)
                    row["export s"] = round(time.perf_counter() - started, 1)
            run_case(row, path, args.samples, args.scan)
        except Exception as error:   # a case that fails is a result: record why and go on
            row["works"], row["why not"] = "no", f"{type(error).__name__}: {first_line(error)}"[:160]
        rows.append(row)
        print({k: v for k, v in row.items() if v != "–"}, flush=True)
    notes = [f"{family.full_name}: {family.why_size}" for family in zoo.FAMILIES.values() if family.why_size]
    publish(merged(rows), HEADER, "coverage")
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
