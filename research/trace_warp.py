"""The trace where the verdict's warp search decided (docs/research/trace-warp.md): removal only, no fine-tuning.

Per model (a benchmark case), on the cell's training split (1,800 of its 2,000 defender images, seed 0, as the
repair splits them): the default `combined` verdict (with its warp search: cached beside the cell as
``verdict_combined-warp_train_seed0.json``; ``verdict_combined_train_seed0.json`` is the verdict before the warp
search), then `fmt_audit.fmt.trace.trace_verdict` (the warp trace where the warp decided), then, on the cell's
test images through ONNX Runtime with masks at 0: ACC and ASR as given, with the traced channels removed, and
with as many random channels per layer (seed 0). Rows go to ``research/results/trace_warp_TAG.jsonl`` as they
come; a model already there is skipped.

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/trace_warp.py \\
        matrix:mnist-lenet-wanet-p10-r2,mnist-lenet-clean-r2 --tag dev
    python research/trace_warp.py --summary      # the page's rule on the measured rows and both repairs' rows
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TOOK, CUT, SHARE, ASR_SLACK, ACC_SLACK, BOUND = 0.9, 0.5, 2 / 3, 0.01, 0.005, 0.1     # the page's rule
REPAIR = "trace + unlearning (self-checked)"


def verdict_of(folder: Path, loaded, train, preprocessing, seed: int):
    """The default verdict on the training split (cached as the Verdict's fields)."""
    from fmt_audit.repair.selfcheck import verdict_on
    from fmt_audit.verdict import Verdict, VerdictConfig

    path = folder / f"verdict_combined-warp_train_seed{seed}.json"
    if path.exists():
        return Verdict(**json.loads(path.read_text())), None
    started = time.perf_counter()
    found = verdict_on(loaded, loaded.proto, train, preprocessing, "cpu", VerdictConfig(seed=seed))
    fields = {"method": found.method, "suspicion": found.suspicion, "verdict": found.verdict,
              "target_class": found.target_class, "threshold": found.threshold, "basis": found.basis,
              "details": found.details}
    path.write_text(json.dumps(fields, default=float))
    return found, round(time.perf_counter() - started, 1)


def one_case(case, seed: int) -> dict:
    from removal import acc_asr, opened, random_like

    from fmt_audit.fmt.trace import trace_verdict

    folder = Path(case.model).parent
    loaded, masked, classifier, data = opened(case)
    train, _ = data.split(0.1, seed=seed)
    verdict, verdict_s = verdict_of(folder, loaded, train, preprocessing=classifier.preprocessing, seed=seed)
    started = time.perf_counter()
    trace = trace_verdict(classifier, loaded.layers, train, verdict, seed)
    trace_s = round(time.perf_counter() - started, 1)
    flagged = {name: channels for name, channels in trace.pop("layers", {}).items() if channels}
    sizes = {layer.name: layer.out_channels for layer in loaded.layers}
    count = sum(map(len, flagged.values()))
    acc, asr = acc_asr(masked, case, {})
    row = {"model": case.label, "verdict": verdict.verdict, "class": verdict.target_class,
           "decided_by": verdict.details.get("decided_by"), "warp_lead": verdict.details.get("warp_lead"),
           "target": case.target, "ACC": acc, "ASR": asr, "trace": trace, "flagged": count,
           "share": round(count / sum(sizes.values()), 4), "verdict s": verdict_s, "trace s": trace_s,
           "onnx sha256": loaded.sha256[:16]}
    if count:
        a, s = acc_asr(masked, case, flagged)
        ra, rs = acc_asr(masked, case, random_like(flagged, sizes, 0))
        row |= {"ACC removed": a, "ASR removed": s, "ACC random": ra, "ASR random": rs}
    return row


def summary() -> None:
    """docs/research/trace-warp.md's rule on the measured rows: a table, each criterion, the decision."""
    def rows(name: str) -> list[dict]:
        path = RESULTS / name
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    removal = {r["model"]: r for r in rows("trace_warp_measured.jsonl")}
    sides = {side: rows(f"trace_repair_trace-warp-{side}.jsonl") for side in ("main", "branch")}
    given = {r["model"]: r for found in sides.values() for r in found if r["method"] == "none"}
    repaired = {side: {r["model"]: r for r in found if r["method"] == REPAIR} for side, found in sides.items()}
    print("| model | ASR as given | verdict (decided by) | flagged (share) | ASR removed | random | repair main: "
          "ACC / ASR / word | branch: ACC / ASR / word |\n|---|---|---|---|---|---|---|---|")
    counted = []
    for model, r in removal.items():
        main, branch = repaired["main"].get(model), repaired["branch"].get(model)

        def brief(row: dict | None, base: dict | None) -> str:
            if row is None:
                return "–"
            change = f"{100 * (row['ACC'] - base['ACC']):+.2f}" if base else "?"
            asr = "–" if row["ASR"] is None else f"{100 * row['ASR']:.1f}%"
            return f"{change} / {asr} / {row['self-check']['status']}"

        asr = "–" if r["ASR"] is None else f"{100 * r['ASR']:.1f}%"
        removed = f"{100 * r['ASR removed']:.1f}%" if "ASR removed" in r else asr
        random = f"{100 * r['ASR random']:.1f}%" if "ASR random" in r else asr
        print(f"| {model} | {asr} | {r['verdict']} ({r['decided_by'] or '–'}) | {r['flagged']} "
              f"({100 * r['share']:.1f}%) | {removed} | {random} | {brief(main, given.get(model))} | "
              f"{brief(branch, given.get(model))} |")
        if r["ASR"] is not None and r["ASR"] >= TOOK:
            counted.append((r, main, branch))
    n = len(counted)
    print(f"\ncounted (WaNet, ASR as given >= {TOOK:.0%}): {n}" + ("" if n >= 4 else " (fewer than 4: not decided)"))
    if not n:
        return
    cuts = [r["ASR"] - r.get("ASR removed", r["ASR"]) for r, _, _ in counted]
    beats = [r.get("ASR removed", r["ASR"]) < r.get("ASR random", r["ASR"]) for r, _, _ in counted]
    one = sum(c >= CUT for c in cuts) >= SHARE * n
    two = sum(beats) >= SHARE * n
    print(f"(1) cut >= {CUT:.0%} points on {sum(c >= CUT for c in cuts)} of {n}: {'met' if one else 'not met'}")
    print(f"(2) below as many random channels on {sum(beats)} of {n}: {'met' if two else 'not met'}")
    pairs = [(r, m, b) for r, m, b in counted if m is not None and b is not None]
    if len(pairs) < n:
        print(f"(3) repairs of {len(pairs)} of {n} models so far: not decided")
        return
    mean_asr = {side: sum(x[i]["ASR"] for x in pairs) / n for i, side in ((1, "main"), (2, "branch"))}
    mean_acc = {side: sum(x[i]["ACC"] - given[x[0]["model"]]["ACC"] for x in pairs) / n
                for i, side in ((1, "main"), (2, "branch"))}
    over = [r["model"] for r, m, b in pairs if b["ASR"] > BOUND >= m["ASR"]]
    three = (mean_asr["branch"] <= mean_asr["main"] + ASR_SLACK and not over
             and mean_acc["branch"] >= mean_acc["main"] - ACC_SLACK)
    print(f"(3) repair: mean ASR main {100 * mean_asr['main']:.2f}% / branch {100 * mean_asr['branch']:.2f}%; mean "
          f"ACC change main {100 * mean_acc['main']:+.2f} / branch {100 * mean_acc['branch']:+.2f}; over "
          f"{BOUND:.0%} where main is not: {over or 'none'}: {'met' if three else 'not met'}")
    print("decision:", "ships" if n >= 4 and one and two and three else "does not ship" if n >= 4 else "not decided")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="?")
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--tag", default="dev")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.summary:
        summary()
        return
    from cases import cases

    results = RESULTS / f"trace_warp_{args.tag}.jsonl"
    done = {json.loads(line)["model"] for line in results.read_text().splitlines()} if results.exists() else set()
    for case in cases(args.cases, clean=True):
        if case.label in done:
            continue
        row = one_case(case, args.seed)
        with results.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
