"""docs/research/verdict-warp.md: the combined verdict's warp search, as the verdict runs it (its 256-image
sample, seed 0, `WarpConfig()`), on models it was not developed on; rows appended to
research/results/verdict_warp.jsonl as they come (a rerun skips the models done), then the pre-registered counts.

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/warp_measure.py \\
        population:digits:clean,warp:6-12 matrix:mnist-lenet-wanet-p10-r4 ...
    python research/warp_measure.py --summary
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "verdict_warp.jsonl"
TOOK = {"population": 0.8, "matrix": 0.9}      # each family's own "the attack took" (verdict_population.py, matrix)


def measure(spec: str, done: set[str], results: Path = RESULTS) -> None:
    import torch
    from warp_probe import models

    from fmt_audit.backends.torch.logits import logit_classifier
    from fmt_audit.data import Preprocessing, load_data
    from fmt_audit.model.loading import load_model
    from fmt_audit.verdict.combined import WARP_CUT, warp_lead
    from fmt_audit.verdict.config import VerdictConfig, WarpConfig
    from fmt_audit.verdict.evidence.warp import warp_search

    torch.set_num_threads(1)
    clean = spec.startswith("matrix:") and "-clean" in spec
    for case in models(spec, clean):
        if case.label in done:
            continue
        started = time.time()
        loaded = load_model(case.model)
        verdict = VerdictConfig()
        data = load_data(case.defender, loaded.image_input, loaded.num_classes).take(verdict.samples,
                                                                                      seed=verdict.seed)
        classifier, classes, _ = logit_classifier(loaded.proto, loaded.image_input, Preprocessing(case.mean, case.std),
                                                  "cpu", None, "warp search")
        found = warp_search(classifier, data, classes, WarpConfig(seed=verdict.seed))
        _, top, lead = warp_lead(found.success)
        facts = json.loads((case.model.parent / "facts.json").read_text())
        row = {"model": case.label, "family": spec.split(":")[0], "attack": facts["attack"],
               "target": case.target, "asr": facts.get("asr"), "success": found.success, "lead": lead,
               "class": top, "over the cut": lead >= WARP_CUT,
               "time s": round(time.time() - started, 1)}
        results.parent.mkdir(exist_ok=True)
        with results.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "success"}), flush=True)


def summary(results: Path = RESULTS) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    warping = [r for r in rows if r["attack"] in ("warp", "wanet")]
    took = [r for r in warping if (r["asr"] or 0) >= TOOK[r["family"]]]
    clean = [r for r in rows if r["attack"] == "clean"]
    others = [r for r in rows if r not in warping and r not in clean]
    found = [r for r in took if r["over the cut"] and r["class"] == r["target"]]
    false = [r for r in clean if r["over the cut"]]
    hijacked = [r for r in others if r["over the cut"] and r["class"] != r["target"]]
    print("| model | attack | ASR | lead | class | target | over the cut | s |\n|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["attack"], r["model"])):
        asr = "–" if r["asr"] is None else f"{100 * r['asr']:.1f}"
        target = "–" if r["target"] is None else r["target"]
        print(f"| {r['model']} | {r['attack']} | {asr} | {r['lead']:.3f} | {r['class']} | {target} | "
              f"{'yes' if r['over the cut'] else 'no'} | {r['time s']} |")
    print(f"\n(1) warping backdoors that took: {len(found)} of {len(took)} found with the target named "
          f"(needs at least 2/3): {'met' if took and 3 * len(found) >= 2 * len(took) else 'not met'}"
          f"; not counted (attack did not take): {len(warping) - len(took)}")
    allowed = max(1, int(0.05 * len(clean)))       # 5%, and one where 5% is less than one model
    print(f"(2) clean models over the cut: {len(false)} of {len(clean)} (needs at most {allowed}): "
          f"{'met' if len(false) <= allowed else 'not met'}")
    print(f"(3) other backdoors where the warp names another class over the cut: {len(hijacked)} of {len(others)} "
          f"(needs at most 1): {'met' if len(hijacked) <= 1 else 'not met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="the rows' file (development rows: research/results/verdict_warp_dev.jsonl)")
    args = parser.parse_args()
    if args.summary:
        summary(args.results)
        return
    done = {json.loads(line)["model"] for line in args.results.read_text().splitlines()} if args.results.exists() \
        else set()
    for spec in args.models:
        measure(spec, done, args.results)


if __name__ == "__main__":
    main()
