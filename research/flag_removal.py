"""Removal only, no fine-tuning: what the trace's channels and the per-channel default scan's flags carry
(docs/research/scan-trace-default.md, pre-registered before any row; ``--h2h``: the head-to-head of
docs/research/scan-trace-h2h.md, its own rows and rule).

Per model (a benchmark case), on its test images through ONNX Runtime with masks at 0: as given; the trace's
channels removed (the repair's cached trace, ``trace_train_seed0.json``, written by ``trace_repair.py``); as many
random channels per layer (seed 0); the same for the default scan's flags where one is cached
(``scan_default_n256_seed0_*.json``). Rows go to ``research/results/flag_removal.jsonl`` (``--h2h``:
``flag_removal_h2h.jsonl``; ``--tag TAG``: ``flag_removal_TAG.jsonl``) as they come; a model already there is
skipped. ``--summary`` applies the page's rule to the rows.

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/flag_removal.py \\
        matrix:cifar10-vgg-badnets-p01 ...
    python research/flag_removal.py --summary
    python research/flag_removal.py --summary --h2h
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "flag_removal.jsonl"
H2H_RESULTS = RESULTS.with_name("flag_removal_h2h.jsonl")
# the rule's figures (docs/research/scan-trace-default.md)
CUT_POINTS, SHARE_OF_MODELS, TOOK, CHANNEL_TARGET = 0.5, 0.8, 0.9, 0.05
NOT_COUNTED = {"matrix cifar10-preact18q-inputaware-p10 (cpu)"}     # its removal-only row was read before
# docs/research/scan-trace-h2h.md: the per-channel flags may out-cut the trace by this much on at most one model
H2H_MARGIN, H2H_EXCEPTIONS = 0.2, 1
H2H_MODELS = [f"matrix {cell}-p10-r2 (cpu)" for cell in (
    "mnist-lenet-badnets", "mnist-lenet-blended", "mnist-lenet-wanet", "mnist-plaincnn-badnets",
    "gtsrb-preact18q-badnets", "cifar10-plaincnn-badnets", "cifar10-plaincnn-lowfreq", "cifar10-plaincnn-inputaware")]


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
    verdict = json.loads((folder / "verdict_combined_train_seed0.json").read_text())
    if verdict.get("decided_by") == "warp":
        # the repair follows the warp where it decided (trace_verdict, 0.4.0); trace_repair.py's cached trace
        # (trace_channels) follows the reversed stamp: the repair's channels are traced again, as it does
        trace = cached_warp_trace(case, loaded, verdict, folder / "trace_warp_train_seed0.json")
    scans = sorted(folder.glob("scan_default_n256_seed0_*.json"))
    return {"model": case.label, "onnx sha256": loaded.sha256[:16], "channels": total, "ACC": acc, "ASR": asr,
            "trace stop": trace.get("stop"), "trace": cut(trace["flagged"]),
            "default scan": cut(ScanReport.read(scans[-1]).flagged) if scans else None}


def cached_warp_trace(case, loaded, found: dict, path: Path) -> dict:
    """The repair's trace where the verdict's warp decided: ``trace_verdict`` on the repair's training split
    (seed 0), as ``fmt_audit.repair.methods.fmt`` runs it; cached beside the cell."""
    if path.exists():
        return json.loads(path.read_text())
    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.data import Preprocessing, load_npz
    from fmt_audit.fmt.scan import ScanConfig, scanned_layers
    from fmt_audit.fmt.trace import trace_verdict
    from fmt_audit.repair.config import RepairConfig
    from fmt_audit.verdict.base import Verdict

    keys = ("method", "suspicion", "verdict", "target_class", "threshold", "basis")
    verdict = Verdict(*(found[k] for k in keys), details={k: v for k, v in found.items() if k not in keys})
    train, _ = load_npz(case.defender).split(RepairConfig().holdout, seed=0)
    preprocessing = Preprocessing(case.mean, case.std)
    traced = trace_verdict(BridgedClassifier(to_torch(loaded.proto), preprocessing, "cpu"),
                           scanned_layers(loaded, ScanConfig(seed=0, mean=case.mean, std=case.std)), train, verdict)
    trace = {"flagged": traced.get("layers", {}), "stop": traced.get("stop", traced.get("skipped"))}
    path.write_text(json.dumps(trace))
    return trace


def summary(results: Path, h2h: bool) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    counted = [r for r in rows if r["model"] not in NOT_COUNTED and r["ASR"] is not None and r["ASR"] >= TOOK]
    twins: list[str] = []
    print("| model | ASR as given | trace: flagged (share) | ASR after | random | default scan: flagged | ASR after | "
          "random |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, d = r["trace"], r["default scan"]
        if r["ASR"] is None:    # a clean twin: what each flags and the accuracy left (scan-trace-h2h.md)
            scan_text = f"{d['flagged']} flagged, ACC {d['ACC']:.1%}" if d else "–"
            twins.append(f"- {r['model']} (clean twin, ACC {r['ACC']:.1%}): trace {t['flagged']} flagged, "
                         f"ACC {t['ACC']:.1%}; per-channel {scan_text}")
            continue
        default = (f"{d['flagged']} ({d['share']:.1%}) | {d['ASR']:.1%} | {d['random ASR']:.1%}" if d else "– | – | –")
        note = "" if r in counted else " (not counted)"
        print(f"| {r['model']}{note} | {r['ASR']:.1%} | {t['flagged']} ({t['share']:.1%}) | {t['ASR']:.1%} | "
              f"{t['random ASR']:.1%} | {default} |")
    if twins:
        print("\n" + "\n".join(twins))
    if not counted:
        return
    cut = [r for r in counted if r["ASR"] - r["trace"]["ASR"] >= CUT_POINTS]
    beaten = [r["model"] for r in counted if r["trace"]["flagged"] and r["trace"]["ASR"] >= r["trace"]["random ASR"]]
    small = [r for r in cut if r["trace"]["share"] <= CHANNEL_TARGET]
    print(f"\n{len(counted)} counted; (1) ASR cut by >= 50 points on {len(cut)} ({len(cut) / len(counted):.0%}; "
          f"needs >= {SHARE_OF_MODELS:.0%}): {'met' if len(cut) >= SHARE_OF_MODELS * len(counted) else 'not met'}")
    print(f"(2) more than random wherever something is flagged: {'met' if not beaten else f'not met: {beaten}'}")
    print(f"reported: of the cut ones, {len(small)} at <= 5% of the channels")
    if h2h:
        head_to_head(counted, rows)


def head_to_head(counted: list[dict], rows: list[dict]) -> None:
    """docs/research/scan-trace-h2h.md's rule: the trace against the per-channel flags, model by model."""
    missing = sorted(set(H2H_MODELS) - {r["model"] for r in rows})
    if missing:
        print(f"\nnot decided yet: no row of {len(missing)} of the {len(H2H_MODELS)} models ({', '.join(missing)})")
        return
    paired = [r for r in counted if r["default scan"] is not None]
    if len(paired) < len(counted):
        print(f"not decided: {len(counted) - len(paired)} counted models lack the per-channel scan's row")
        return

    def cut(row: dict, flags: str) -> float:
        return row["ASR"] - row[flags]["ASR"]

    trace_cuts = sum(cut(r, "trace") >= CUT_POINTS for r in paired)
    scan_cuts = sum(cut(r, "default scan") >= CUT_POINTS for r in paired)
    worse = [r["model"] for r in paired if cut(r, "default scan") - cut(r, "trace") >= H2H_MARGIN]
    first, second = trace_cuts > scan_cuts, len(worse) <= H2H_EXCEPTIONS
    print(f"\nhead to head over {len(paired)}: (1) cut by >= 50 points: trace on {trace_cuts}, per-channel on "
          f"{scan_cuts}: {'met' if first else 'not met'}; (2) per-channel 20+ points ahead on {len(worse)} "
          f"(at most {H2H_EXCEPTIONS}){': ' + ', '.join(worse) if worse else ''}: {'met' if second else 'not met'}")
    scan_beaten = [r["model"] for r in paired if r["default scan"]["flagged"]
                   and r["default scan"]["ASR"] >= r["default scan"]["random ASR"]]
    print(f"reported: per-channel flags no better than random on {len(scan_beaten)}; per-channel flags cut 50 "
          f"points on {scan_cuts / len(paired):.0%}")
    decision = "the trace becomes scan's default" if first and second else "scan keeps the per-channel test"
    print(f"decision: {decision}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*")
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--h2h", action="store_true", help="docs/research/scan-trace-h2h.md: its rows and rule")
    parser.add_argument("--tag", help="rows in results/flag_removal_TAG.jsonl (another study's models)")
    args = parser.parse_args()
    results = H2H_RESULTS if args.h2h else RESULTS.with_name(f"flag_removal_{args.tag}.jsonl") if args.tag else RESULTS
    if args.summary:
        summary(results, args.h2h)
        return
    from cases import cases

    done = {json.loads(line)["model"] for line in results.read_text().splitlines()} if results.exists() else set()
    for case in (c for name in args.models for c in cases(name, clean=True)):    # twins: ACC only
        if case.label in done:
            continue
        row = removal_row(case)
        print(json.dumps(row), flush=True)
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
