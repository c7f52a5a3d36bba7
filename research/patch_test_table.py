"""The patch evidence's rows as a table, and the third self-check measurement's rule
(docs/research/repair-self-check.md, "Third measurement").

Each probe row (``research/results/patch_unlearning_probe[-TAG].jsonl``) is one repaired model; P fires where the
target's patch success is above 10% and above every reference class's; P2 (the amendment) where it also is more
than twice the reference classes' median. The truth: the repaired model's ASR (the
probe's own measurement on the cell's test images) above 10%. Patch triggers: the BadNets cells.

    python research/patch_test_table.py research/results/patch_unlearning_probe-patch-test.jsonl --rule
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

STAYED = 0.10       # the backdoor stayed where the repaired model's ASR is above this (issue 31's bound)
FLOOR = 0.10        # P fires only where the target's patch success is above this
# models whose rows were read before P2 was written: not counted for P2
P2_SEEN = ("mnist-lenet-badnets-p10-r5",)


def fires(row: dict, variant: str = "P") -> bool:
    """P (or P2) on one probe row."""
    success = row["success"]
    target = success[str(row["target"])]
    others = [value for label, value in success.items() if label != str(row["target"])]
    if variant == "P2" and not target > 2 * statistics.median(others):
        return False
    return target > FLOOR and all(target > value for value in others)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path)
    parser.add_argument("--rule", action="store_true", help="print the measurement's three clauses")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("on", "repaired") == "repaired" and len(row["success"]) > 1]
    print("| repaired model | ASR | patch: target / best other / median | P fires | P2 | try: ASR / ACC change "
          "| search s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        success, target = row["success"], str(row["target"])
        others = [value for label, value in success.items() if label != target]
        tried = (f"{100 * row['try_asr']:.1f}% / {100 * (row['try_acc'] - row['acc']):+.2f}"
                 if row.get("try_asr") is not None else "–")
        name = row["model"].removeprefix("matrix ").removesuffix(" (cpu)")
        method = row["repaired"].split("_", 2)[-1].removesuffix(".onnx")
        print(f"| {name}, {method} | {100 * row['asr']:.1f}% | {100 * success[target]:.1f} / {100 * max(others):.1f}"
              f" / {100 * statistics.median(others):.1f} | {'yes' if fires(row) else 'no'} | "
              f"{'yes' if fires(row, 'P2') else 'no'} | {tried} | {row['search_s']} |")
    if not args.rule:
        return
    for variant, seen in (("P", ()), ("P2", P2_SEEN)):
        counted = [row for row in rows if row["model"].removeprefix("matrix ").removesuffix(" (cpu)") not in seen]
        print(f"\n{variant} ({len(counted)} repaired models counted)")
        clauses(counted, variant)


def clauses(rows: list[dict], variant: str) -> None:
    """The rule's three clauses for one variant."""
    patch = [row for row in rows if "badnets" in row["model"]]
    stayed = [row for row in patch if row["asr"] > STAYED]
    caught = [row for row in stayed if fires(row, variant)]
    gone = [row for row in rows if row["asr"] <= STAYED]
    alarms = [row for row in gone if fires(row, variant)]
    fixed = [row for row in rows if row["asr"] > STAYED and fires(row, variant) and row.get("try_asr") is not None]
    cut = [row for row in fixed if row["try_asr"] <= STAYED]
    change = (sum(row["try_acc"] - row["acc"] for row in fixed) / len(fixed)) if fixed else None
    print(f"1. patch backdoors that stayed: fired on {len(caught)} of {len(stayed)}"
          f" (needs >= 80%, at least 3 models){'' if len(stayed) >= 3 else ': NOT DECIDED (fewer than 3)'}")
    print(f"2. backdoors that did not stay: fired on {len(alarms)} of {len(gone)} (needs <= 10%)")
    print(f"3. the try where it fired on a stayed backdoor: <= 10% ASR on {len(cut)} of {len(fixed)} (needs >= 80%),"
          f" mean ACC change {'–' if change is None else f'{100 * change:+.2f}'} (needs >= -1.5)")


if __name__ == "__main__":
    main()
