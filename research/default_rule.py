"""Issue 31: the rule that makes ``trace + unlearning`` the default repair, applied to the held-out rows as
pre-registered in docs/research/set-selection.md ("When `trace + unlearning` becomes the default").

A held-out cell is *in* when it has both pass-1 rows (``trace + unlearning`` and ``fine-tuning only``); the
criteria are computed over the cells in whose attack took as given (ASR >= 90% on the ``none`` row): (1) mean
ASR at most 3%, (2) no cell above 10%, (3) mean ASR below fine-tuning only's. Decided once 12 of the 17
held-out cells are in. Reads only the jsonl rows; Markdown on stdout.

    python research/default_rule.py research/results/trace_repair_heldout.jsonl
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from trace_repair_table import latest_rows

HELD_OUT = 17           # cells of the held-out list (research/heldout_trace_repair.sh)
DECIDED_AT = 12
TOOK = 0.90             # ASR as given from which an attack took
MEAN_ASR, MAX_ASR = 0.03, 0.10
PASS_1 = ("trace + unlearning", "fine-tuning only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=Path)
    args = parser.parse_args()
    cells = latest_rows(args.rows)
    inside = {cell: rows for cell, rows in cells.items() if all(m in rows for m in PASS_1)}
    print("| cell | ASR as given | trace + unlearning ACC / ASR | fine-tuning only ACC / ASR | counted |")
    print("|---|---|---|---|---|")
    counted = {}
    for cell, rows in sorted(inside.items()):
        given = rows.get("none", {}).get("ASR")
        took = given is not None and given >= TOOK
        if took:
            counted[cell] = rows
        t, f = rows[PASS_1[0]], rows[PASS_1[1]]
        print(f"| {cell} | {'?' if given is None else f'{100 * given:.1f}%'} | {100 * t['ACC']:.1f} / "
              f"{100 * t['ASR']:.1f}% | {100 * f['ACC']:.1f} / {100 * f['ASR']:.1f}% | "
              f"{'yes' if took else 'no (attack did not take)'} |")
    print(f"\n{len(inside)} of {HELD_OUT} held-out cells in ({DECIDED_AT} decide), {len(counted)} counted")
    if not counted:
        return
    traced = [r[PASS_1[0]]["ASR"] for r in counted.values()]
    tuned = [r[PASS_1[1]]["ASR"] for r in counted.values()]
    change = [r[PASS_1[0]]["ACC"] - r["none"]["ACC"] for r in counted.values()]
    checks = {f"(1) mean ASR {100 * statistics.mean(traced):.2f}% <= {100 * MEAN_ASR:g}%":
              statistics.mean(traced) <= MEAN_ASR,
              f"(2) largest ASR {100 * max(traced):.2f}% <= {100 * MAX_ASR:g}%": max(traced) <= MAX_ASR,
              f"(3) mean ASR below fine-tuning only's {100 * statistics.mean(tuned):.2f}%":
              statistics.mean(traced) < statistics.mean(tuned)}
    for text, held in checks.items():
        print(f"- {text}: {'met' if held else 'NOT met'}")
    print(f"- ACC change (reported, not a criterion): mean {100 * statistics.mean(change):+.2f} points")
    if len(inside) < DECIDED_AT and max(traced) > MAX_ASR:     # a row is final: no later cell can undo it
        print(f"\nsettled before the {DECIDED_AT}th cell: criterion (2) can no longer be met, trace + unlearning "
              "does not become the default under this rule")
    elif len(inside) < DECIDED_AT:
        print(f"\nnot decided yet: {DECIDED_AT - len(inside)} more cells to go")
    else:
        print(f"\ndecided: trace + unlearning {'becomes' if all(checks.values()) else 'does not become'} the default")


if __name__ == "__main__":
    main()
