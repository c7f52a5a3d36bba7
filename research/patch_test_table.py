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
# the repairs' rows (the model as given: ASR, the verdict's class), for the fifth measurement's exclusions
REPAIRS = Path(__file__).resolve().parent / "results" / "trace_repair_patch-test.jsonl"


def stands_out(target: float, others: list[float], median_factor: float | None = 2.0) -> bool:
    """Whether the target's patch success stands out from the other classes' (P: ``median_factor`` None)."""
    if median_factor is not None and not target > median_factor * statistics.median(others):
        return False
    return target > FLOOR and all(target > value for value in others)


def fires(row: dict, variant: str = "P") -> bool:
    """P (or P2, which is A's rule) on one probe row."""
    success = row["success"]
    others = [value for label, value in success.items() if label != str(row["target"])]
    return stands_out(success[str(row["target"])], others, 2.0 if variant == "P2" else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path)
    parser.add_argument("--rule", action="store_true", help="print the measurement's three clauses")
    parser.add_argument("--tried", action="store_true",
                        help="the fifth measurement's rule: A with the try's re-check (rows of --recheck)")
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
    if args.tried:
        tried_clauses(rows)
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


def tried(row: dict) -> tuple[str, float, float]:
    """A with the try's re-check on one row: the self-check's word from the patch (``may persist`` where A fired
    and the try's model was not kept, ``removed`` otherwise; ``incomplete`` where A fired and the re-check is
    missing) and the ASR and ACC of the model the repair would write."""
    if not fires(row, "P2"):
        return "removed", row["asr"], row["acc"]
    if "try_verdict" not in row:
        return "incomplete", row["asr"], row["acc"]
    if not row["try_leads"] and row["try_verdict"]["verdict"] == "clean":
        return "removed", row["try_asr"], row["try_acc"]
    return "may persist", row["asr"], row["acc"]


def exclusion(row: dict, repairs: list[dict]) -> str | None:
    """Why a row of the fifth measurement is not counted (its rule's exclusions, from ``repairs``' rows of the same
    training, matched by the given model's sha256): ``None`` where it counts."""
    if "given_sha256" not in row:
        return "no sha256 of the model as given"
    same = [r for r in repairs if r.get("onnx sha256") == row["given_sha256"]]
    given = next((r for r in same if r["method"] == "none"), None)
    verdicts = {r["verdict"]["class"] for r in same if "verdict" in r}
    if given is None or not verdicts:
        return "no repair rows of this training"
    if given["ASR"] < 0.90:
        return f"ASR as given {100 * given['ASR']:.1f}% (under 90%)"
    if verdicts != {row["target"]}:
        return f"the verdict named {sorted(verdicts)}, not the target {row['target']}"
    return None


def tried_clauses(rows: list[dict]) -> None:
    """The fifth measurement's three clauses (docs/research/repair-self-check.md, "Fifth measurement")."""
    print("\n| repaired model | ASR | A | try re-check: target / leads / verdict | word | ASR / ACC change written |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        word, asr, acc = tried(row)
        check = (f"{100 * row['try_success']:.1f} / {'yes' if row['try_leads'] else 'no'} / "
                 f"{row['try_verdict']['verdict']}" if "try_verdict" in row else "–")
        print(f"| {row['model'].removeprefix('matrix ').removesuffix(' (cpu)')}, "
              f"{row['repaired'].split('_', 2)[-1].removesuffix('.onnx')} | {100 * row['asr']:.1f}% | "
              f"{'yes' if fires(row, 'P2') else 'no'} | {check} | {word} | {100 * asr:.1f}% / "
              f"{100 * (acc - row['acc']):+.2f} |")
    repairs = [json.loads(line) for line in REPAIRS.read_text().splitlines() if line.strip()]
    counted, incomplete = [], 0
    for row in rows:
        if why := exclusion(row, repairs):
            print(f"not counted: {row['model']}, {row['repaired']}: {why}")
        elif tried(row)[0] == "incomplete":
            incomplete += 1
        else:
            counted.append(row)
    rows = counted
    stayed = [row for row in rows if "badnets" in row["model"] and row["asr"] > STAYED]
    good = [row for row in stayed if tried(row)[0] == "may persist" or tried(row)[1] <= STAYED]
    gone = [row for row in rows if row["asr"] <= STAYED]
    alarms = [row for row in gone if tried(row)[0] == "may persist"]
    worse = [row for row in gone if tried(row)[1] > STAYED]
    kept = [row for row in rows if fires(row, "P2") and tried(row)[0] == "removed"]
    change = sum(row["try_acc"] - row["acc"] for row in kept) / len(kept) if kept else None
    print(f"\nA with the try's re-check ({len(rows)} repaired models counted, {incomplete} incomplete)")
    print(f"1. patch backdoors that stayed: written with <= 10% ASR or said `may persist` on {len(good)} of "
          f"{len(stayed)} (needs >= 80%, at least 3 models){'' if len(stayed) >= 3 else ': NOT DECIDED'}")
    print(f"2. backdoors that did not stay: said `may persist` on {len(alarms)} of {len(gone)} (needs <= 10%), "
          f"written above 10% ASR on {len(worse)} (needs none)")
    print(f"3. tries kept: {len(kept)}, mean ACC change {'–' if change is None else f'{100 * change:+.2f}'}"
          f" (needs >= -1.5)")


if __name__ == "__main__":
    main()
