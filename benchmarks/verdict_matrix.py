"""The default verdict on every cell of the development matrix (issue 31's evidence): ROC-AUC of its
suspicion between the clean twins and the backdoored cells whose attack took (ASR >= 90%), the share called
suspicious at the default threshold in each, and how often the class named is the target.

Each cell's verdict is `fmt_audit.verdict.assess` as `fmt-audit scan` runs it by default (the `combined`
method, 256 of the cell's 2,000 defender images, seed 0, the normalisation the cell expects), one cell per
fresh process, appended to CACHE/verdict_matrix.jsonl as it comes (a rerun skips the cells done).

    python benchmarks/verdict_matrix.py run [matrix:PART,...]     # default: every exported cell
    python benchmarks/verdict_matrix.py summary                   # tables, and results/verdict_matrix.json
    python benchmarks/verdict_matrix.py summary --from trace-caches
    python benchmarks/verdict_matrix.py run matrix:mnist-lenet-clean-r2,... --tag warp   # rows of another code

``--tag T`` keeps a run's rows apart (CACHE/verdict_matrix-T.jsonl, results/verdict_matrix-T.json): a verdict
that changed (0.4's warp search) is measured afresh, beside the rows of the code before it. Each row names
the commit that gave it.

``--from trace-caches`` summarises another population the same way: the verdicts ``research/trace_repair.py``
caches beside each cell it repaired (``verdict_combined_train_seed0.json``: the same verdict on 256 images of the
cell's 1,800-image training split), which covers the cells retrained on the CPU and their replicas (``-rN``);
written to results/verdict_matrix_trace_caches.json (``--tag warp``: only the verdicts with the warp search, 0.4.0
on, to results/verdict_matrix_trace_caches-warp.json). The cache does not outlive its machine, so the rows already
in that file are kept and the cache adds the cells they lack (a cell retrained under a name already there is
another model: the first one measured keeps the row, as benchmarks/results/matrix_cpu.json keeps its entry).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cases import CACHE, HERE, MATRIX, matrix_folders, normalisation, replica_of

ROWS = CACHE / "verdict_matrix.jsonl"
TOOK = 0.9      # a backdoored cell counts when its attack took: ASR at least this on the test set


def rows_file(tag: str | None) -> Path:
    return ROWS if not tag else CACHE / f"verdict_matrix-{tag}.jsonl"


def commit() -> str | None:
    found = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or None


def one_cell(folder: Path) -> dict:
    """The default verdict on one cell (run in a fresh process by ``run``)."""
    from fmt_audit.verdict import VerdictConfig, assess

    facts = json.loads((folder / "facts.json").read_text())
    mean, std = normalisation(folder / "model.onnx")
    started, cpu_started = time.perf_counter(), time.process_time()
    verdict = assess(folder / "model.onnx", folder / "defender.npz", VerdictConfig(), mean, std, device="cpu")
    found = verdict.to_dict()
    return {"cell": folder.name, "attack": facts["attack"], "target": facts.get("target"),
            "asr": facts.get("asr"), "verdict": found["verdict"], "suspicion": found.get("suspicion"),
            "class": found.get("target_class"), "threshold": found.get("threshold"),
            "basis": found.get("basis"), "seconds": round(time.perf_counter() - started, 1),
            # this process's CPU time: unlike the wall time, not inflated where the process waited or was paused
            "cpu seconds": round(time.process_time() - cpu_started, 1),
            "threads": os.environ.get("OMP_NUM_THREADS"), "commit": commit()}


def done_cells(rows: Path) -> set[str]:
    return {json.loads(line)["cell"] for line in rows.read_text().splitlines()} if rows.exists() else set()


def run(name: str, rows: Path = ROWS) -> None:
    # all: the first models of every cell (replicas, -rN, are new models for other studies: by name only)
    folders = sorted(f for f in MATRIX.glob("*") if (f / "model.onnx").exists() and not replica_of(f.name)[1]) \
        if name == "all" else matrix_folders(name)
    done = done_cells(rows)
    # smallest graphs first, so that an interrupted run has covered as many cells as the time allowed
    for folder in sorted(folders, key=lambda f: ((f / "model.onnx").stat().st_size, f.name)):
        if folder.name in done:
            continue
        result = subprocess.run([sys.executable, __file__, "cell", str(folder)], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{folder.name}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
            continue
        row = result.stdout.strip().splitlines()[-1]
        with rows.open("a") as out:
            out.write(row + "\n")
        print(row, flush=True)


def auc(negatives: list[float], positives: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counted half: the Mann-Whitney form of ROC-AUC (None
    without both)."""
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
    return round(sum(pairs) / len(pairs), 3) if pairs else None


def median(values: list[float]) -> float | None:
    """The upper median (the value at index len // 2 of the sorted list), None when empty."""
    return sorted(values)[len(values) // 2] if values else None


def _share(hits: list[bool]) -> float | None:
    return round(sum(hits) / len(hits), 3) if hits else None


def trace_cache_rows(seed: int = 0, kept: Path | None = None, warp_only: bool = False) -> list[dict]:
    """``one_cell``'s rows from the verdicts research/trace_repair.py cached beside the cells (no timing kept),
    after the rows of ``kept`` (an earlier summary's file), whose cells the cache does not replace.
    ``warp_only``: only the verdicts with the warp search (0.4.0 on), whose figures carry ``warp_budgets``."""
    rows = json.loads(kept.read_text())["rows"] if kept is not None and kept.exists() else []
    known = {r["cell"] for r in rows}
    for folder in sorted(MATRIX.glob("*")):
        cached = folder / f"verdict_combined_train_seed{seed}.json"
        if not cached.exists() or folder.name in known:
            continue
        facts, found = json.loads((folder / "facts.json").read_text()), json.loads(cached.read_text())
        if warp_only and "warp_budgets" not in found:
            continue
        rows.append({"cell": folder.name, "attack": facts["attack"], "target": facts.get("target"),
                     "asr": facts.get("asr"), "verdict": found["verdict"], "suspicion": found.get("suspicion"),
                     "class": found.get("target_class"), "threshold": found.get("threshold"),
                     "basis": found.get("basis"), "seconds": None, "threads": None})
    return rows


def summary(rows: list[dict], name: str = "verdict_matrix") -> dict:
    clean = [r for r in rows if r["attack"] == "clean"]
    backdoored = [r for r in rows if r["attack"] != "clean" and (r["asr"] or 0) >= TOOK]
    left_out = [r["cell"] for r in rows if r["attack"] != "clean" and (r["asr"] or 0) < TOOK]

    def called(group: list[dict]) -> float | None:
        return _share([r["verdict"] == "suspicious" for r in group])

    def scores(group: list[dict]) -> list[float]:
        return [r["suspicion"] for r in group if r["suspicion"] is not None]

    result = {
        "cells": len(rows), "clean twins": len(clean), "backdoored (attack took)": len(backdoored),
        "left out (attack did not take)": left_out,
        "inconclusive": [r["cell"] for r in rows if r["suspicion"] is None],
        "roc_auc": auc(scores(clean), scores(backdoored)),
        "false positive rate": called(clean), "true positive rate": called(backdoored),
        "target named (of those called suspicious)": _share(
            [r["class"] == r["target"] for r in backdoored if r["verdict"] == "suspicious"]),
        "per attack": {},
        "clean twins' named classes": {r["cell"]: r["class"] for r in clean},
        "median seconds": median([r["seconds"] for r in rows if r["seconds"] is not None]),
        "median cpu seconds (rows that have it)": median([r["cpu seconds"] for r in rows if r.get("cpu seconds")]),
    }
    for attack in sorted({r["attack"] for r in backdoored}):
        group = [r for r in backdoored if r["attack"] == attack]
        result["per attack"][attack] = {"cells": len(group), "called suspicious": called(group),
                                        "auc vs clean twins": auc(scores(clean), scores(group))}
    print("| cell | attack | ASR | verdict | suspicion | class named | target | s |\n|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["attack"] != "clean", r["cell"])):
        suspicion = "–" if r["suspicion"] is None else f"{r['suspicion']:.3f}"
        asr = "–" if r["asr"] is None else f"{100 * r['asr']:.1f}"
        print(f"| {r['cell']} | {r['attack']} | {asr} | {r['verdict']} | {suspicion} | {r['class']} | "
              f"{r['target'] if r['attack'] != 'clean' else '–'} | {'–' if r['seconds'] is None else r['seconds']} |")
    print(json.dumps(result, indent=1))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{name}.json").write_text(json.dumps({"summary": result, "rows": rows}, indent=1)
                                                          + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "summary", "cell"))
    parser.add_argument("what", nargs="?", default="all")
    parser.add_argument("--from", dest="source", choices=("runs", "trace-caches"), default="runs",
                        help="summary: this script's own runs, or the verdicts research/trace_repair.py cached")
    parser.add_argument("--tag", help="run/summary: the rows of runs given this tag (another code's verdict)")
    args = parser.parse_args()
    if args.command == "cell":
        print(json.dumps(one_cell(Path(args.what))))
    elif args.command == "run":
        run(args.what, rows_file(args.tag))
    elif args.source == "trace-caches":
        # --tag warp: the verdicts with the warp search only, kept apart from the rows of the code before it
        name = "verdict_matrix_trace_caches" + (f"-{args.tag}" if args.tag else "")
        summary(trace_cache_rows(kept=HERE / "results" / f"{name}.json", warp_only=args.tag == "warp"), name)
    else:
        rows = rows_file(args.tag)
        summary([json.loads(line) for line in rows.read_text().splitlines()],
                "verdict_matrix" + (f"-{args.tag}" if args.tag else ""))


if __name__ == "__main__":
    main()
