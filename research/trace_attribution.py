"""docs/research/trace-attribution.md's rules on the measured rows (research/trace_attribution_queue.sh writes them).

    python research/trace_attribution.py             # the first test (2026-12-06)
    python research/trace_attribution.py --test 2    # the second: new models, clause 4 counts both ways
    python research/trace_attribution.py --test 2 --cells    # its models, in the queue's order
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TOOK, CUT, SHARE, ASR_SLACK, ACC_SLACK, BOUND, DECIDED = 0.9, 0.5, 2 / 3, 0.01, 0.005, 0.1, 6   # the page's rule
REPAIR = "trace + unlearning (self-checked)"
SIDES = ("main", "branch")
# the second test's models, trained after its pre-registration (none with a trace row of any kind before it);
# decided when every one has its rows (at least DECIDED counted)
SECOND = ("gtsrb-preact18q-badnets-p10-r3", "cifar10-plaincnn-badnets-p10-r4", "cifar10-plaincnn-lowfreq-p10-r5",
          "cifar10-plaincnn-inputaware-p10-r3", "mnist-lenet-badnets-p10-r4", "mnist-plaincnn-badnets-p10-r4",
          "mnist-lenet-blended-p10-r4", "cifar10-vgg-badnets-p10-r1", "cifar10-vgg-blended-p10-r1")


def rows(name: str) -> list[dict]:
    path = RESULTS / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def removed_asr(row: dict) -> float:
    return row.get("ASR removed", row["ASR"])     # nothing flagged: nothing removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=int, choices=(1, 2), default=1)
    parser.add_argument("--cells", action="store_true", help="print the test's models (the second test's) and stop")
    args = parser.parse_args()
    if args.cells:
        print(" ".join(SECOND))
        return
    suffix = "" if args.test == 1 else "2"
    removal = {side: {r["model"]: r for r in rows(f"trace_warp_attribution{suffix}-measured-{side}.jsonl")}
               for side in SIDES}
    repairs = {side: rows(f"trace_repair_trace-attribution{suffix}-{side}.jsonl") for side in SIDES}
    given = {r["model"]: r for found in repairs.values() for r in found if r["method"] == "none"}
    repaired = {side: {r["model"]: r for r in found if r["method"] == REPAIR} for side, found in repairs.items()}
    print("| model | ASR as given | verdict | main: flagged, ASR removed (random) | branch: flagged, ASR removed "
          "(random) | repair main: ACC change / ASR / word | branch |\n|---|---|---|---|---|---|---|")
    counted = []
    for model, b in removal["branch"].items():
        m = removal["main"].get(model)

        def cut(r: dict | None) -> str:
            if r is None:
                return "–"
            return (f"{r['flagged']} ({100 * r['share']:.1f}%), {100 * removed_asr(r):.1f}% "
                    f"({100 * r.get('ASR random', r['ASR']):.1f}%)")

        def brief(r: dict | None, model: str = model) -> str:
            base = given.get(model)
            if r is None or base is None:
                return "–"
            return f"{100 * (r['ACC'] - base['ACC']):+.2f} / {100 * r['ASR']:.1f}% / {r['self-check']['status']}"

        print(f"| {model} | {100 * b['ASR']:.1f}% | {b['verdict']} ({b['class']}) | {cut(m)} | {cut(b)} | "
              f"{brief(repaired['main'].get(model))} | {brief(repaired['branch'].get(model))} |")
        if b["ASR"] >= TOOK and b["verdict"] == "suspicious" and b["class"] == b["target"] and m is not None:
            counted.append((m, b, repaired["main"].get(model), repaired["branch"].get(model)))
    n = len(counted)
    whole = [c for c in counted if c[2] is not None and c[3] is not None]
    print(f"\ncounted (ASR as given >= {TOOK:.0%}, the target named): {n}; with both repairs: {len(whole)}")
    if not n:
        return
    drops = {side: [r["ASR"] - removed_asr(r) >= CUT for r in (c[i] for c in counted)]
             for i, side in enumerate(SIDES)}
    one = sum(drops["branch"]) >= sum(drops["main"]) and sum(drops["branch"]) >= SHARE * n
    print(f"(1) cut >= {CUT:.0%} points: main {sum(drops['main'])} of {n}, branch {sum(drops['branch'])} of {n}: "
          f"{'met' if one else 'not met'}")
    shares = {side: statistics.median(c[i]["share"] for c in counted) for i, side in enumerate(SIDES)}
    two = shares["branch"] <= shares["main"]
    print(f"(2) median share flagged: main {100 * shares['main']:.2f}%, branch {100 * shares['branch']:.2f}%: "
          f"{'met' if two else 'not met'}")
    beats = sum(removed_asr(c[1]) < c[1].get("ASR random", c[1]["ASR"]) for c in counted)
    three = beats >= SHARE * n
    print(f"(3) branch below as many random channels on {beats} of {n}: {'met' if three else 'not met'}")
    missing = [cell for cell in SECOND if not any(cell in m for m in removal["branch"])] if args.test == 2 else []
    if len(whole) < DECIDED or (args.test == 2 and (missing or len(whole) < n)):
        print(f"(4) repairs of {len(whole)} models with both sides: not decided (the rule needs {DECIDED}"
              + (f"; the second test every listed model's rows: {len(missing)} without)" if args.test == 2 else ")"))
        print("decision: not decided")
        return
    k = len(whole)
    asr = {side: sum(c[2 + i]["ASR"] for c in whole) / k for i, side in enumerate(SIDES)}
    acc = {side: sum(c[2 + i]["ACC"] - given[c[1]["model"]]["ACC"] for c in whole) / k for i, side in enumerate(SIDES)}
    if args.test == 1:    # no model above the bound where main's is at or below it
        over = [c[1]["model"] for c in whole if c[3]["ASR"] > BOUND >= c[2]["ASR"]]
        bounded = not over
        words = f"over {BOUND:.0%} where main is not: {over or 'none'}"
    else:                 # no more models above the bound than main's
        above = {side: [c[1]["model"] for c in whole if c[2 + i]["ASR"] > BOUND] for i, side in enumerate(SIDES)}
        bounded = len(above["branch"]) <= len(above["main"])
        words = f"over {BOUND:.0%}: main {above['main'] or 'none'}, branch {above['branch'] or 'none'}"
    four = asr["branch"] <= asr["main"] + ASR_SLACK and bounded and acc["branch"] >= acc["main"] - ACC_SLACK
    print(f"(4) repair: mean ASR main {100 * asr['main']:.2f}% / branch {100 * asr['branch']:.2f}%; mean ACC change "
          f"main {100 * acc['main']:+.2f} / branch {100 * acc['branch']:+.2f}; {words}: {'met' if four else 'not met'}")
    print("decision:", "ships" if n >= DECIDED and one and two and three and four else "does not ship")

if __name__ == "__main__":
    main()
