"""The rule of docs/research/repair-universal-unlearning.md's test, read from the rows: the re-fitted universal
unlearning against the repair that ships, per model and by the four clauses.

    python research/universal_test_rule.py
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean as mean

RESULTS = Path(__file__).resolve().parent / "results"
NEW, SHIPPED = "trace + re-fitted universal unlearning (self-checked)", "trace + unlearning (self-checked)"
LOW = [f"cifar10-plaincnn-lowfreq-p10-r{n}" for n in (8, 9, 10, 11)]
OTHER = ["cifar10-plaincnn-badnets-p10-r14", "cifar10-plaincnn-badnets-p10-r15", "cifar10-plaincnn-badnets-p10-r16",
         "cifar10-plaincnn-inputaware-p10-r3", "cifar10-vgg-badnets-p10-r2", "mnist-lenet-badnets-p10-r8",
         "mnist-lenet-blended-p10-r7", "mnist-lenet-wanet-p10-r10", "mnist-plaincnn-badnets-p10-r8",
         "cifar10-vgg-blended-p10-r1"]


def rows() -> dict:
    found: dict = {}
    for name in ("trace_repair_shipped.jsonl", "trace_repair_universal-test.jsonl"):
        for line in (RESULTS / name).read_text().splitlines():
            row = json.loads(line)
            found.setdefault((row["model"], row["method"]), row)
    return found


def main() -> None:
    found = rows()
    table = {}
    for cell in LOW + OTHER:
        label = f"matrix {cell} (cpu)"
        given, old, new = (found.get((label, m)) for m in ("none", SHIPPED, NEW))
        if not (given and old and new):
            print(f"{cell}: rows missing")
            continue
        table[cell] = {"shipped": (round(100 * (old["ACC"] - given["ACC"]), 2), round(100 * old["ASR"], 2)),
                       "new": (round(100 * (new["ACC"] - given["ACC"]), 2), round(100 * new["ASR"], 2))}
        print(f"{cell}: ACC change / ASR shipped {table[cell]['shipped']}, re-fitted {table[cell]['new']}")
    low = [table[c] for c in LOW if c in table]
    other = [table[c] for c in OTHER if c in table]
    complete = len(low) == len(LOW) and len(other) == len(OTHER)
    lower = sum(t["new"][1] < t["shipped"][1] for t in low)
    low_new, low_old = mean([t["new"][1] for t in low]), mean([t["shipped"][1] for t in low])
    one = low_new < low_old and lower >= 3
    two = all(t["new"][1] <= t["shipped"][1] + 1 for t in other)
    three = all(not (t["new"][1] > 10 and t["shipped"][1] <= 10) for t in low + other)
    acc_old, acc_new = mean([t["shipped"][0] for t in low + other]), mean([t["new"][0] for t in low + other])
    four = acc_new >= acc_old - 0.5
    print(f"models with both rows: {len(low)} of {len(LOW)} low-frequency, {len(other)} of {len(OTHER)} other")
    print(f"(1) low-frequency mean ASR {low_new:.2f} against {low_old:.2f}, lower on {lower} of {len(low)}: {one}")
    print(f"(2) no other model more than 1 point higher: {two}")
    print(f"(3) none above 10% where the shipped repair was at or below: {three}")
    print(f"(4) mean ACC change {acc_new:.2f} against {acc_old:.2f} (at most 0.5 worse): {four}")
    verdict = "won" if one and two and three and four else "lost"
    print(f"test: {verdict}" if complete else f"test: not complete ({verdict} so far)")


if __name__ == "__main__":
    main()
