"""Issue 31: ``trace + unlearning`` against today's default repair (``default + unlearning``), head to head on
held-out cells, as pre-registered in docs/research/set-selection.md ("Trace + unlearning against today's
default, head to head").

A listed cell is *in* when it has its three rows (``trace + unlearning``, ``default + unlearning``,
``fine-tuning only``); it counts when its attack took as given (ASR >= 90% on the ``none`` row). Over the
counted cells ``trace + unlearning`` becomes the default repair if (a) its mean ASR is lower than
``default + unlearning``'s, (b) on no cell its ASR is more than 5 points above ``default + unlearning``'s and
(c) its mean ACC change is at most 1 point below ``default + unlearning``'s. Decided when every listed cell
that trains has its three rows, at least 4 of them counted (a GPU-only cell joins once it has a row); settled
early when (b) fails on a counted cell, since a row is final. ``gtsrb-preact18q-wanet-p10`` is shown, never
counted. Both methods are reported against the issue's targets (mean ASR <= 3%, none above 10%). Reads
only the jsonl rows; Markdown on stdout.

    python research/head_to_head.py research/results/trace_repair_heldout.jsonl
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from default_rule import TOOK  # the same reading of "the attack took" as pass 1's rule
from trace_repair_table import latest_rows

# the cells of the pre-registration, in the order research/cpu_queue.sh runs them; the GPU-only ones join
# only if a GPU trains them before the decision
CELLS = ("cifar10-plaincnn-lowfreq-p10", "cifar10-vgg-badnets-p01", "cifar10-preact18q-badnets-p05",
         "cifar10-preact18q-inputaware-p10", "cifar10-preact18q-badnets-p01", "cifar10-preact18q-blended-p01")
GPU_ONLY = ("cifar10-preact18-badnets-p10", "cifar10-mobilenetv2-issba-p10", "cifar10-mobilenetv2-sig-p10")
REPORTED = ("gtsrb-preact18q-wanet-p10",)       # shown, never counted (its attack did not take: 78.1%)
TRACE, DEFAULT, TUNED = "trace + unlearning", "default + unlearning", "fine-tuning only"
METHODS = (TRACE, DEFAULT, TUNED)
AT_LEAST = 4            # counted cells the decision needs
WORSE_ON_A_CELL = 0.05  # (b): ASR points above the default's on any one cell
ACC_MARGIN = 0.01       # (c): mean ACC change points below the default's


def name(cell: str) -> str:
    """The cell of a row's label (``matrix NAME``, with `` (cpu)`` where retrained on the CPU)."""
    return cell.removeprefix("matrix ").removesuffix(" (cpu)")


def decide(cells: dict[str, dict[str, dict]]) -> list[str]:
    """The rule's lines over ``cells`` (label -> method -> row), as printed."""
    listed = {cell: rows for cell, rows in cells.items() if name(cell) in CELLS + GPU_ONLY + REPORTED}
    inside = {cell: rows for cell, rows in listed.items() if all(m in rows for m in METHODS)}
    lines = ["| cell | ASR as given | trace + unlearning ACC / ASR | default + unlearning ACC / ASR | "
             "fine-tuning only ACC / ASR | counted |", "|---|---|---|---|---|---|"]
    counted = {}
    for cell, rows in sorted(inside.items()):
        given = rows.get("none", {}).get("ASR")
        took = given is not None and given >= TOOK and name(cell) not in REPORTED
        if took:
            counted[cell] = rows
        shown = " | ".join(f"{100 * rows[m]['ACC']:.1f} / {100 * rows[m]['ASR']:.1f}%" for m in METHODS)
        lines.append(f"| {cell} | {'?' if given is None else f'{100 * given:.1f}%'} | {shown} | "
                     f"{'yes' if took else 'no (attack did not take)'} |")
    # every CPU cell until it is in; a GPU-only cell once it has a row (it joins if trained before the decision)
    waiting = [c for c in CELLS if not any(name(cell) == c for cell in inside)]
    waiting += [name(cell) for cell in listed if name(cell) in GPU_ONLY and cell not in inside]
    lines.append(f"\n{len(inside)} cells in, {len(counted)} counted; waiting for: {', '.join(waiting) or 'none'}")
    if not counted:
        lines.append("\nnot decided yet" if waiting else
                     f"\ncannot be decided: every cell is in and fewer than {AT_LEAST} count; the default stays")
        return lines

    def asr(method: str) -> list[float]:
        return [rows[method]["ASR"] for rows in counted.values()]

    def change(method: str) -> list[float]:
        return [rows[method]["ACC"] - rows["none"]["ACC"] for rows in counted.values()]

    # rounded: rows hold four decimals, and 0.0821 - 0.0321 must be 5 points, not 5.000000000000001
    worst = round(max(t - d for t, d in zip(asr(TRACE), asr(DEFAULT))), 9)
    gap = round(statistics.mean(change(TRACE)) - statistics.mean(change(DEFAULT)), 9)
    checks = {
        f"(a) mean ASR {100 * statistics.mean(asr(TRACE)):.2f}% below default + unlearning's "
        f"{100 * statistics.mean(asr(DEFAULT)):.2f}%": statistics.mean(asr(TRACE)) < statistics.mean(asr(DEFAULT)),
        f"(b) at most {100 * WORSE_ON_A_CELL:g} points above it on every cell (largest: {100 * worst:+.1f})":
        worst <= WORSE_ON_A_CELL,
        f"(c) mean ACC change {100 * statistics.mean(change(TRACE)):+.2f} at most {100 * ACC_MARGIN:g} point below "
        f"its {100 * statistics.mean(change(DEFAULT)):+.2f}": gap >= -ACC_MARGIN}
    lines += [f"- {text}: {'met' if held else 'NOT met'}" for text, held in checks.items()]
    for method in METHODS:
        values = asr(method)
        lines.append(f"- against the issue's targets, {method}: mean ASR {100 * statistics.mean(values):.2f}% "
                     f"(<= 3%: {'yes' if statistics.mean(values) <= 0.03 else 'no'}), largest "
                     f"{100 * max(values):.2f}% (<= 10%: {'yes' if max(values) <= 0.10 else 'no'})")
    if worst > WORSE_ON_A_CELL:     # a counted row is final: no later cell can undo (b)
        lines.append("\nsettled: (b) can no longer be met, trace + unlearning does not become the default")
    elif waiting:
        lines.append("\nnot decided yet")
    elif len(counted) < AT_LEAST:
        lines.append(f"\ncannot be decided: every cell is in and fewer than {AT_LEAST} count; the default stays")
    else:
        lines.append(f"\ndecided: trace + unlearning {'becomes' if all(checks.values()) else 'does not become'} "
                     "the default")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=Path)
    args = parser.parse_args()
    print("\n".join(decide(latest_rows(args.rows))))


if __name__ == "__main__":
    main()
