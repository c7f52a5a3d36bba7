"""The rule of docs/research/verdict-twins.md over research/results/verdict_twins.jsonl: the 0.4.0 verdict's
false-positive rate on new clean twins (with a 95% Clopper-Pearson interval), the classes they name, and the
ROC-AUC of their suspicion against the 0.4.0 verdicts of the backdoored models cached or summarised so far
(benchmarks/results/verdict_matrix-warp.json, verdict_matrix_trace_caches-warp.json).

    python research/verdict_twins.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scipy.stats import beta

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from verdict_matrix import TOOK, auc  # noqa: E402

ROWS = ROOT / "research" / "results" / "verdict_twins.jsonl"
BACKDOORED = [ROOT / "benchmarks" / "results" / name for name in
              ("verdict_matrix-warp.json", "verdict_matrix_trace_caches-warp.json")]
FPR_TARGET, AUC_TARGET = 0.05, 0.95     # issue 31's verdict targets


def main() -> None:
    twins = [json.loads(line) for line in ROWS.read_text().splitlines()] if ROWS.exists() else []
    backdoored = {}
    for path in BACKDOORED:
        for row in json.loads(path.read_text())["rows"] if path.exists() else []:
            if row["attack"] != "clean" and (row["asr"] or 0) >= TOOK:
                backdoored.setdefault(row["cell"], row)     # a cell in both: the first file's row
    print("| twin | verdict | suspicion | class named |\n|---|---|---|---|")
    for row in twins:
        print(f"| {row['cell']} | {row['verdict']} | {row['suspicion']:.3f} | {row['class']} |")
    if not twins:
        return
    called = sum(row["verdict"] == "suspicious" for row in twins)
    n = len(twins)
    upper = 1.0 if called == n else float(beta.ppf(0.975, called + 1, n - called))
    lower = 0.0 if called == 0 else float(beta.ppf(0.025, called, n - called + 1))
    area = auc([r["suspicion"] for r in twins], [r["suspicion"] for r in backdoored.values()])
    print(f"\n{n} twins: {called} called suspicious, rate {called / n:.1%} (95% interval {lower:.1%}–{upper:.1%}); "
          f"target <= {FPR_TARGET:.0%}: {'met' if called / n <= FPR_TARGET else 'not met'} (point estimate)")
    print(f"ROC-AUC against {len(backdoored)} backdoored models (0.4.0 verdict, attack took): {area}; "
          f"target >= {AUC_TARGET}: {'met' if area is not None and area >= AUC_TARGET else 'not met'}")
    named = sorted({row["class"] for row in twins if row["verdict"] == "suspicious"})
    print(f"classes the suspicious twins name: {named or 'none'} (every matrix attack's target is class 0)")


if __name__ == "__main__":
    main()
