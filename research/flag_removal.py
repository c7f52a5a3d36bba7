"""Removal only, no fine-tuning: what the trace's channels and the per-channel default scan's flags carry
(docs/research/scan-trace-default.md, pre-registered before any row).

Per model (a benchmark case), on its test images through ONNX Runtime with masks at 0: as given; the trace's
channels removed (the repair's cached trace, ``trace_train_seed0.json``, written by ``trace_repair.py``); as many
random channels per layer (seed 0); the same for the default scan's flags where one is cached
(``scan_default_n256_seed0_*.json``). Rows go to ``research/results/flag_removal.jsonl`` as they come; a model
already there is skipped. ``--summary`` applies the page's rule to the rows.

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/flag_removal.py \\
        matrix:cifar10-vgg-badnets-p01 ...
    python research/flag_removal.py --summary
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "flag_removal.jsonl"
# the rule's figures (docs/research/scan-trace-default.md)
CUT_POINTS, SHARE_OF_MODELS, TOOK, CHANNEL_TARGET = 0.5, 0.8, 0.9, 0.05
NOT_COUNTED = {"matrix cifar10-preact18q-inputaware-p10 (cpu)"}     # its removal-only row was read before


def removal_row(case) -> dict:
    from removal import acc_asr, random_like

    from fmt_audit.backends.onnxrt.masked import MaskedModel
    from fmt_audit.data import Preprocessing
    from fmt_audit.model.loading import load_model
    from fmt_audit.report.json_report import ScanReport

    folder = Path(case.model).parent
    loaded = load_model(case.model)
    masked = MaskedModel(loaded.proto, "cpu", Preprocessing(case.mean, case.std))
    sizes = {layer.name: layer.out_channels for layer in loaded.layers}
    total = sum(sizes.values())
    acc, asr = acc_asr(masked, case, {})

    def cut(flagged: dict[str, list[int]]) -> dict:
        flagged = {name: list(channels) for name, channels in flagged.items() if channels}
        count = sum(map(len, flagged.values()))
        if not count:
            return {"flagged": 0, "share": 0.0, "ACC": acc, "ASR": asr, "random ACC": acc, "random ASR": asr}
        a, s = acc_asr(masked, case, flagged)
        ra, rs = acc_asr(masked, case, random_like(flagged, sizes, 0))
        return {"flagged": count, "share": round(count / total, 4), "ACC": a, "ASR": s, "random ACC": ra,
                "random ASR": rs}

    trace = json.loads((folder / "trace_train_seed0.json").read_text())
    scans = sorted(folder.glob("scan_default_n256_seed0_*.json"))
    return {"model": case.label, "channels": total, "ACC": acc, "ASR": asr,
            "trace stop": trace.get("stop"), "trace": cut(trace["flagged"]),
            "default scan": cut(ScanReport.read(scans[-1]).flagged) if scans else None}


def summary() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    counted = [r for r in rows if r["model"] not in NOT_COUNTED and r["ASR"] is not None and r["ASR"] >= TOOK]
    print("| model | ASR as given | trace: flagged (share) | ASR cut | random | default scan: flagged | ASR cut | "
          "random |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, d = r["trace"], r["default scan"]
        default = (f"{d['flagged']} ({d['share']:.1%}) | {d['ASR']:.1%} | {d['random ASR']:.1%}" if d else "– | – | –")
        note = "" if r in counted else " (not counted)"
        print(f"| {r['model']}{note} | {r['ASR']:.1%} | {t['flagged']} ({t['share']:.1%}) | {t['ASR']:.1%} | "
              f"{t['random ASR']:.1%} | {default} |")
    if not counted:
        return
    cut = [r for r in counted if r["ASR"] - r["trace"]["ASR"] >= CUT_POINTS]
    beaten = [r["model"] for r in counted if r["trace"]["flagged"] and r["trace"]["ASR"] >= r["trace"]["random ASR"]]
    small = [r for r in cut if r["trace"]["share"] <= CHANNEL_TARGET]
    print(f"\n{len(counted)} counted; (1) ASR cut by >= 50 points on {len(cut)} ({len(cut) / len(counted):.0%}; "
          f"needs >= {SHARE_OF_MODELS:.0%}): {'met' if len(cut) >= SHARE_OF_MODELS * len(counted) else 'not met'}")
    print(f"(2) more than random wherever something is flagged: {'met' if not beaten else f'not met: {beaten}'}")
    print(f"reported: of the cut ones, {len(small)} at <= 5% of the channels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if args.summary:
        summary()
        return
    from cases import cases

    done = {json.loads(line)["model"] for line in RESULTS.read_text().splitlines()} if RESULTS.exists() else set()
    for case in (c for name in args.models for c in cases(name)):
        if case.label in done:
            continue
        row = removal_row(case)
        print(json.dumps(row), flush=True)
        with RESULTS.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
