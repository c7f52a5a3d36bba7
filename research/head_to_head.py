"""Issue 31: pre-registered head-to-heads of two repairs on cells neither has seen, each a :class:`Study`.

A listed cell is *in* when it has the study's three rows (candidate, incumbent and the reference shown beside
them, ``fine-tuning only``); it counts when its attack took as given (ASR >= 90% on the ``none`` row). Over the
counted cells the candidate wins if (a) its mean ASR is lower than the incumbent's, (b) on no cell its ASR is
more than 5 points above the incumbent's and (c) its mean ACC change is at most 1 point below the incumbent's.
Decided when every listed cell that trains has its rows and at least ``at_least`` of them count (a GPU-only
cell joins once it has a row); settled early when (b) fails on a counted cell, since a row is final. Reported
beside the rule: each method against the issue's targets (mean ASR <= 3%, none above 10%) and its re-activated
ASR. Reads only the jsonl rows; Markdown on stdout.

``--study default``: ``trace + unlearning`` against today's default repair (``default + unlearning``), at least
4 counted, ``gtsrb-preact18q-wanet-p10`` shown, never counted (docs/research/set-selection.md, "Trace +
unlearning against today's default, head to head"). ``--study stamp``: ``trace + stamp unlearning`` against
``trace + unlearning`` on replica cells, at least 5 counted (docs/research/repair-stamp-unlearning.md).

    python research/head_to_head.py research/results/trace_repair_heldout.jsonl
    python research/head_to_head.py --study stamp research/results/trace_repair_stamp-heldout.jsonl
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

from default_rule import TOOK  # the same reading of "the attack took" as pass 1's rule
from trace_repair_table import latest_rows


@dataclass(frozen=True)
class Study:
    """A pre-registered head-to-head: ``candidate`` against ``incumbent`` (``reference`` shown beside them) on
    ``cells``; ``gpu_only`` cells join once they have a row, ``reported`` ones are shown, never counted."""

    cells: tuple[str, ...]
    candidate: str
    incumbent: str
    reference: str = "fine-tuning only"
    gpu_only: tuple[str, ...] = ()
    reported: tuple[str, ...] = ()
    at_least: int = 4               # counted cells the decision needs
    wins: str = "becomes the default"
    loses: str = "does not become the default"
    stays: str = "the default stays"

    @property
    def methods(self) -> tuple[str, str, str]:
        return self.candidate, self.incumbent, self.reference


STUDIES = {
    # docs/research/set-selection.md, "Trace + unlearning against today's default, head to head"; the cells in
    # the order research/cpu_queue.sh runs them; the GPU-only ones join only if a GPU trains them in time
    "default": Study(
        cells=("cifar10-plaincnn-lowfreq-p10", "cifar10-vgg-badnets-p01", "cifar10-preact18q-badnets-p05",
               "cifar10-preact18q-inputaware-p10", "cifar10-preact18q-badnets-p01", "cifar10-preact18q-blended-p01"),
        candidate="trace + unlearning", incumbent="default + unlearning",
        gpu_only=("cifar10-preact18-badnets-p10", "cifar10-mobilenetv2-issba-p10", "cifar10-mobilenetv2-sig-p10"),
        reported=("gtsrb-preact18q-wanet-p10",)),       # its attack did not take: 78.1%
    # docs/research/repair-stamp-unlearning.md: new models (replica 1) of the cells, never seen by any method
    "stamp": Study(
        cells=("cifar10-plaincnn-badnets-p10-r1", "cifar10-plaincnn-lowfreq-p10-r1",
               "cifar10-plaincnn-inputaware-p10-r1", "mnist-plaincnn-badnets-p10-r1", "mnist-lenet-badnets-p10-r1",
               "mnist-lenet-blended-p10-r1", "mnist-lenet-wanet-p10-r1", "gtsrb-preact18q-badnets-p10-r1"),
        candidate="trace + stamp unlearning", incumbent="trace + unlearning", at_least=5,
        wins="replaces trace + unlearning as the candidate", loses="is not pursued",
        stays="trace + unlearning stays the candidate"),
}
WORSE_ON_A_CELL = 0.05  # (b): ASR points above the incumbent's on any one cell
ACC_MARGIN = 0.01       # (c): mean ACC change points below the incumbent's


def name(cell: str) -> str:
    """The cell of a row's label (``matrix NAME``, with `` (cpu)`` where retrained on the CPU)."""
    return cell.removeprefix("matrix ").removesuffix(" (cpu)")


def decide(cells: dict[str, dict[str, dict]], study: Study = STUDIES["default"]) -> list[str]:
    """The rule's lines over ``cells`` (label -> method -> row), as printed."""
    candidate, incumbent, _ = methods = study.methods
    listed = {cell: rows for cell, rows in cells.items()
              if name(cell) in study.cells + study.gpu_only + study.reported}
    inside = {cell: rows for cell, rows in listed.items() if all(m in rows for m in methods)}
    lines = ["| cell | ASR as given | " + " | ".join(f"{m} ACC / ASR" for m in methods) + " | counted |",
             "|---|---|---|---|---|---|"]
    counted = {}
    for cell, rows in sorted(inside.items()):
        given = rows.get("none", {}).get("ASR")
        took = given is not None and given >= TOOK and name(cell) not in study.reported
        if took:
            counted[cell] = rows
        shown = " | ".join(f"{100 * rows[m]['ACC']:.1f} / {100 * rows[m]['ASR']:.1f}%" for m in methods)
        lines.append(f"| {cell} | {'?' if given is None else f'{100 * given:.1f}%'} | {shown} | "
                     f"{'yes' if took else 'no (attack did not take)'} |")
    # every CPU cell until it is in; a GPU-only cell once it has a row (it joins if trained before the decision)
    waiting = [c for c in study.cells if not any(name(cell) == c for cell in inside)]
    waiting += [name(cell) for cell in listed if name(cell) in study.gpu_only and cell not in inside]
    lines.append(f"\n{len(inside)} cells in, {len(counted)} counted; waiting for: {', '.join(waiting) or 'none'}")
    undecidable = f"\ncannot be decided: every cell is in and fewer than {study.at_least} count; {study.stays}"
    if not counted:
        lines.append("\nnot decided yet" if waiting else undecidable)
        return lines

    def asr(method: str) -> list[float]:
        return [rows[method]["ASR"] for rows in counted.values()]

    def change(method: str) -> list[float]:
        return [rows[method]["ACC"] - rows["none"]["ACC"] for rows in counted.values()]

    # rounded: rows hold four decimals, and 0.0821 - 0.0321 must be 5 points, not 5.000000000000001
    worst = round(max(t - d for t, d in zip(asr(candidate), asr(incumbent))), 9)
    gap = round(statistics.mean(change(candidate)) - statistics.mean(change(incumbent)), 9)
    mean_asr = {method: statistics.mean(asr(method)) for method in methods}
    checks = {
        f"(a) mean ASR {100 * mean_asr[candidate]:.2f}% below {incumbent}'s {100 * mean_asr[incumbent]:.2f}%":
        mean_asr[candidate] < mean_asr[incumbent],
        f"(b) at most {100 * WORSE_ON_A_CELL:g} points above it on every cell (largest: {100 * worst:+.1f})":
        worst <= WORSE_ON_A_CELL,
        f"(c) mean ACC change {100 * statistics.mean(change(candidate)):+.2f} at most {100 * ACC_MARGIN:g} point "
        f"below its {100 * statistics.mean(change(incumbent)):+.2f}": gap >= -ACC_MARGIN}
    lines += [f"- {text}: {'met' if held else 'NOT met'}" for text, held in checks.items()]
    for method in methods:
        values = asr(method)
        lines.append(f"- against the issue's targets, {method}: mean ASR {100 * statistics.mean(values):.2f}% "
                     f"(<= 3%: {'yes' if statistics.mean(values) <= 0.03 else 'no'}), largest "
                     f"{100 * max(values):.2f}% (<= 10%: {'yes' if max(values) <= 0.10 else 'no'})")
    for method in methods:
        back = [rows[method]["reactivated ASR"] for rows in counted.values() if "reactivated ASR" in rows[method]]
        if back:
            lines.append(f"- re-activated (one epoch with 1% poisoned images), {method}: mean ASR "
                         f"{100 * statistics.mean(back):.2f}%, largest {100 * max(back):.2f}% ({len(back)} cells)")
    if worst > WORSE_ON_A_CELL:     # a counted row is final: no later cell can undo (b)
        lines.append(f"\nsettled: (b) can no longer be met, {candidate} {study.loses}")
    elif waiting:
        lines.append("\nnot decided yet")
    elif len(counted) < study.at_least:
        lines.append(undecidable)
    else:
        lines.append(f"\ndecided: {candidate} {study.wins if all(checks.values()) else study.loses}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=Path)
    parser.add_argument("--study", choices=sorted(STUDIES), default="default",
                        help="default: trace + unlearning against today's default (set-selection.md); stamp: "
                             "trace + stamp unlearning against trace + unlearning (repair-stamp-unlearning.md)")
    args = parser.parse_args()
    print("\n".join(decide(latest_rows(args.rows), STUDIES[args.study])))


if __name__ == "__main__":
    main()
