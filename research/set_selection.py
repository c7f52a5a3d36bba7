"""Issue 31, set selection: does a channel set chosen jointly carry the backdoor? Removal only, no fine-tuning.

For each matrix cell: the joint mask optimisation (``research/joint_masks.py``) on the cell's defender data,
then ACC and ASR (ONNX Runtime, test images of ``benchmarks/cases.py``) with the channels removed
(masks at 0) — the flagged set at the threshold, and the k lowest masks for a grid of shares, each next to
as many random channels per layer (seeded).

    cd benchmarks && PYTHONPATH=.:../research python ../research/set_selection.py matrix:cifar10-vgg-badnets-p10

Rows go to ``research/results/set_selection_<tag>.json`` as they come (one line each).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from cases import cases
from removal import acc_asr, opened, random_like

RESULTS = Path(__file__).resolve().parent / "results"
SHARES = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08)


def lowest(values: dict[str, np.ndarray], k: int) -> dict[str, list[int]]:
    flat = sorted((float(v), name, c) for name, arr in values.items() for c, v in enumerate(arr))
    out: dict[str, list[int]] = {}
    for _, name, c in flat[:k]:
        out.setdefault(name, []).append(c)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tag", default="dev")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--eps", type=float, default=0.4)
    parser.add_argument("--tradeoff", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.2)
    args = parser.parse_args()

    from joint_masks import JointConfig, flagged_by_masks, optimise_masks


    config = JointConfig(eps=args.eps, tradeoff=args.tradeoff, iterations=args.iterations, lr=args.lr,
                         batch_size=args.batch, threshold=args.threshold)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"set_selection_{args.tag}.jsonl"
    for case in (c for name in args.models for c in cases(name)):
        loaded, masked, classifier, defender = opened(case)
        sizes = {layer.name: layer.out_channels for layer in loaded.layers}
        total = sum(sizes.values())
        started = time.perf_counter()
        def progress(step, total, label=case.label, started=started):
            if step % 25 == 0:
                print(f"{label}: {step}/{total} {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

        values = optimise_masks(classifier, loaded.layers, defender, config, progress)
        seconds = round(time.perf_counter() - started, 1)
        row = {"model": case.label, "config": {k: v for k, v in vars(replace(config)).items()},
               "channels": total, "time s": seconds, "base": acc_asr(masked, case, None)}
        flagged = flagged_by_masks(values, config.threshold)
        n = sum(len(c) for c in flagged.values())
        row["threshold"] = {"flagged": n, "pruned": acc_asr(masked, case, flagged),
                            "random": acc_asr(masked, case, random_like(flagged, sizes, 0))}
        row["shares"] = []
        for share in SHARES:
            k = max(1, round(share * total))
            chosen = lowest(values, k)
            row["shares"].append({"share": share, "k": k, "pruned": acc_asr(masked, case, chosen),
                                  "random": acc_asr(masked, case, random_like(chosen, sizes, 0))})
        all_values = np.concatenate(list(values.values()))
        row["mask quantiles"] = [round(float(q), 3) for q in np.quantile(all_values, [0, 0.01, 0.05, 0.1, 0.5])]
        print(json.dumps(row), flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
