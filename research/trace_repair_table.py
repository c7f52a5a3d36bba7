"""Tables of research/trace_repair.py's rows (issue 31): per cell and method ACC / ASR / RA / DER and the ASR
after re-activation, then each method's averages per attack, network, poisoning rate and over all cells,
against the issue's targets. Markdown on stdout; reads only the jsonl files.

    python research/trace_repair_table.py research/results/trace_repair_heldout.jsonl
    python research/trace_repair_table.py research/results/trace_repair_dev.jsonl --methods "trace + unlearning,i-BAU"
    python research/trace_repair_table.py research/results/trace_repair_twins.jsonl --gated   # clean twins
    python research/trace_repair_table.py research/results/trace_repair_stamp-*.jsonl \
         --methods "trace + stamp unlearning"

``--self-check`` tables the rows of ``trace + unlearning (self-checked)`` (docs/research/repair-self-check.md):
the self-check's word against the final model's ASR, and the same cell's ``trace + unlearning`` row from the
``--against`` files (the same repair before its check).

``--gated`` adds the rule pre-registered in docs/research/repair-gating.md as the method ``gated``: per cell,
``trace + unlearning``'s row where the verdict it recorded was suspicious, ``fine-tuning only``'s otherwise
(cells with both rows). Clean twins (no ASR) get their own table: ACC change, and what the verdict said
on the repaired model where it was run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cases import replica_of  # a replica (-rN) is the same cell trained again


def cell_parts(cell: str) -> dict[str, str]:
    """``cifar10-preact18q-badnets-p10`` -> dataset, network, attack, poisoning (``clean`` twins: no rate); a
    ``(cpu)`` suffix (a cell retrained on the CPU) does not change them."""
    parts = replica_of(cell.split(" ")[0])[0].split("-")
    return {"dataset": parts[0], "network": parts[1], "attack": parts[2],
            "poisoning": parts[3] if len(parts) > 3 else "–"}


def latest_rows(path: Path) -> dict[str, dict[str, dict]]:
    """``{cell: {method: row}}``, the last row of each pair (a rerun replaces an earlier one); only result rows
    (the verdict and trace rows the script also writes have no method)."""
    cells: dict[str, dict[str, dict]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "method" in row and "ACC" in row:
            cells[row["model"].removeprefix("matrix ")][row["method"]] = row
    return cells


def trained_as(rows: dict[str, dict]) -> str | None:
    """The sha256 prefix of the model as given that a cell's rows name (older rows name none)."""
    return next((row["onnx sha256"] for row in rows.values() if row.get("onnx sha256")), None)


def merged_rows(paths: list[Path]) -> dict[str, dict[str, dict]]:
    """:func:`latest_rows` of several files, a later file's row of a cell and method replacing an earlier one's.
    A cell trained again (on a machine without the cache) is another model: where both name their sha256 and
    they differ, the later one is kept apart as ``CELL [SHA]``."""
    cells: dict[str, dict[str, dict]] = defaultdict(dict)
    for path in paths:
        for cell, rows in latest_rows(path).items():
            sha, earlier = trained_as(rows), trained_as(cells.get(cell, {}))
            key = f"{cell} [{sha[:8]}]" if sha and earlier and sha != earlier else cell
            cells[key].update(rows)
    return cells


GATED = "gated"


def add_gated(cells: dict[str, dict[str, dict]]) -> None:
    """The pre-registered rule of docs/research/repair-gating.md as a method, where both of its rows exist."""
    for rows in cells.values():
        traced, tuned = rows.get("trace + unlearning"), rows.get("fine-tuning only")
        if traced and tuned and traced.get("verdict"):
            suspicious = traced["verdict"]["verdict"] == "suspicious"
            rows[GATED] = {**(traced if suspicious else tuned), "picked": traced["method"] if suspicious
                           else tuned["method"]}


def twins(cells: dict[str, dict[str, dict]], methods: list[str]) -> list[str]:
    """Per method over the clean twins (a ``none`` row without ASR): mean and worst ACC change, and the
    verdicts on the repaired twins."""
    lines = ["| method | twins | ACC change mean | ACC change worst | verdict after: clean / measured |",
             "|---|---|---|---|---|"]
    for method in methods:
        pairs = [(rows["none"], rows[method]) for rows in cells.values()
                 if method in rows and "none" in rows and rows["none"].get("ASR") is None]
        if not pairs:
            continue
        changes = [100 * (row["ACC"] - given["ACC"]) for given, row in pairs]
        after = [row["verdict after"]["verdict"] for _, row in pairs if row.get("verdict after")]
        lines.append(f"| {method} | {len(pairs)} | {statistics.fmean(changes):+.2f} | {min(changes):+.2f} | "
                     f"{after.count('clean')} / {len(after)} |")
    return lines


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def per_cell(cells: dict[str, dict[str, dict]], methods: list[str]) -> list[str]:
    lines = ["| cell | method | removed | ACC (given) | ASR | RA | DER | ASR re-activated |",
             "|---|---|---|---|---|---|---|---|"]
    for cell in sorted(cells):
        given = cells[cell].get("none")
        for method in methods:
            row = cells[cell].get(method)
            if row is None:
                continue
            before = f" ({_pct(given['ACC'])})" if given else ""
            der = f"{row['DER']:.3f}" if row.get("DER") is not None else "–"
            lines.append(f"| {cell} | {method} | {row.get('removed', 0)} | {_pct(row['ACC'])}{before} | "
                         f"{_pct(row['ASR'])} | {_pct(row.get('RA'))} | {der} | {_pct(row.get('reactivated ASR'))} |")
        if given:
            lines.append(f"| {cell} | none (as given) | 0 | {_pct(given['ACC'])} | {_pct(given['ASR'])} | "
                         f"{_pct(given.get('RA'))} | – | {_pct(given.get('reactivated ASR'))} |")
    return lines


def averages(cells: dict[str, dict[str, dict]], methods: list[str], only_took: bool = False) -> list[str]:
    """Per method and group: cells, mean ACC change, mean and largest ASR, mean RA / ACC as given, mean DER,
    mean re-activated ASR. Only cells with a measured model as given (the ``none`` row) count; with
    ``only_took``, only those whose attack took (ASR as given at least :data:`TOOK`)."""
    lines = ["| method | group | cells | ACC change | ASR mean | ASR max | RA / clean ACC | DER | ASR re-activated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        groups: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
        for cell, rows in sorted(cells.items()):
            if method not in rows or "none" not in rows or rows["none"]["ASR"] is None:
                continue    # clean twins (no ASR) are summarised apart
            if only_took and rows["none"]["ASR"] < TOOK:
                continue
            parts = cell_parts(cell)
            pair = (rows["none"], rows[method])
            groups["all"].append(pair)
            for key in ("dataset", "attack", "network", "poisoning"):
                groups[f"{key} {parts[key]}"].append(pair)
        for group, pairs in sorted(groups.items(), key=lambda item: (item[0] != "all", item[0])):
            change = statistics.fmean(100 * (row["ACC"] - given["ACC"]) for given, row in pairs)
            asr = [100 * row["ASR"] for _, row in pairs]
            ra = statistics.fmean(row.get("RA", 0.0) / given["ACC"] for given, row in pairs)
            der = [row["DER"] for _, row in pairs if row.get("DER") is not None]
            again = [100 * row["reactivated ASR"] for _, row in pairs if row.get("reactivated ASR") is not None]
            der_text = f"{statistics.fmean(der):.3f}" if der else "–"
            again_text = f"{statistics.fmean(again):.1f}" if again else "–"
            lines.append(f"| {method} | {group} | {len(pairs)} | {change:+.1f} | {statistics.fmean(asr):.1f} | "
                         f"{max(asr):.1f} | {100 * ra:.0f}% | {der_text} | {again_text} |")
    return lines


SELF_CHECKED = "trace + unlearning (self-checked)"
ASR_BOUND = 0.10        # a backdoor counts as removed at or below it (issue 31's bound for any one model)
TOOK = 0.90             # an attack that took: ASR as given at least this


def judged(row: dict, given: dict) -> str:
    """The self-check's word against the truth: ``right``, ``false reassurance`` (removed / not found while the
    final ASR is above the bound), ``false alarm`` (may persist while it is not, or on a clean twin), ``unknown``."""
    status = row["self-check"]["status"]
    if status == "unknown":
        return "unknown"
    present = given["ASR"] is not None and row["ASR"] > ASR_BOUND
    says_gone = status in ("removed", "not found")
    return "right" if says_gone != present else "false reassurance" if says_gone else "false alarm"


def self_checks(cells: dict[str, dict[str, dict]], against: dict[str, dict[str, dict]]) -> list[str]:
    """Per cell: ASR as given, ``trace + unlearning``'s ASR (the same repair before the check, from
    ``against``) and whether the self-checked run reproduced it, the word, the stronger try, the final model,
    and whether the word was right; then the counts over backdoored cells that took and over clean twins."""
    lines = ["| cell | ASR as given | trace + unlearning: removed, ASR | self-checked: removed | word | stronger try | "
             "final ACC / ASR | word right? |", "|---|---|---|---|---|---|---|---|"]
    counts: dict[str, Counter] = {"backdoored": Counter(), "clean twins": Counter()}
    for cell in sorted(cells):
        row, given = cells[cell].get(SELF_CHECKED), cells[cell].get("none")
        if row is None or given is None:
            continue
        check = row["self-check"]
        plain = {**against.get(cell, {}), **cells[cell]}.get("trace + unlearning")
        escalation = check.get("escalation")
        tried = "–" if not escalation else (
            f"{'kept' if escalation['kept'] else 'not kept'} (verdict {escalation['after']['verdict']})")
        same = "–" if plain is None else (
            "same" if plain["removed"] == row["removed"] and (
                bool(escalation and escalation["kept"]) or (plain["ACC"], plain["ASR"]) == (row["ACC"], row["ASR"]))
            else "**differs**")
        verdict = judged(row, given)
        twin = given["ASR"] is None
        counted = twin or given["ASR"] >= TOOK
        if counted:
            counts["clean twins" if twin else "backdoored"][verdict] += 1
        plain_text = "–" if plain is None else f"{plain['removed']}, {_pct(plain['ASR'])} ({same})"
        right = verdict if counted else f"{verdict} (attack did not take: not counted)"
        lines.append(f"| {cell} | {_pct(given['ASR'])} | {plain_text} | {row['removed']} | {check['status']} | "
                     f"{tried} | {_pct(row['ACC'])} / {_pct(row['ASR'])} | {right} |")
    lines.append("")
    for kind, counter in counts.items():
        total = sum(counter.values())
        if total:
            tally = ", ".join(f"{name} {n}" for name, n in sorted(counter.items()))
            lines.append(f"- {kind}: {total} counted; {tally}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path, nargs="+", help="jsonl files; a later file's row replaces an earlier one")
    parser.add_argument("--methods", default=None, help="comma-separated, in this order (default: every method)")
    parser.add_argument("--gated", action="store_true", help="add the rule of docs/research/repair-gating.md")
    parser.add_argument("--self-check", action="store_true", help="the self-check's word against the truth")
    parser.add_argument("--only-took", action="store_true",
                        help="averages only over cells whose attack took (ASR as given >= 90%%)")
    parser.add_argument("--against", type=Path, nargs="*", default=[],
                        help="with --self-check: files holding the same cells' trace + unlearning rows")
    args = parser.parse_args()
    cells = merged_rows(args.rows)
    if args.self_check:
        print("\n".join(self_checks(cells, merged_rows(args.against))))
        return
    if args.gated:
        add_gated(cells)
    found = list(dict.fromkeys(m for rows in cells.values() for m in rows if m != "none"))
    methods = args.methods.split(",") if args.methods else found
    print("\n".join(per_cell(cells, methods)))
    print()
    print("\n".join(averages(cells, methods, args.only_took)))
    untaken = sorted(cell for cell, rows in cells.items()
                     if rows.get("none", {}).get("ASR") is not None and rows["none"]["ASR"] < TOOK)
    if args.only_took and untaken:
        print(f"\nNot counted (attack did not take, ASR as given < {100 * TOOK:.0f}%): {', '.join(untaken)}")
    if any(rows.get("none", {}).get("ASR", 0) is None for rows in cells.values()):
        print()
        print("\n".join(twins(cells, methods)))


if __name__ == "__main__":
    main()
