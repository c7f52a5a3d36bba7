"""Issue 32: the screen's fair test, as pre-registered in docs/research/screening.md (ninth session).

Per cell and seed (0, 1, 2: each draws another N of the cell's defender images) the mask test of every channel
on the screen's first N / 4 images and on all N (``screen_rules.scores``, cached), then: ``E_s`` the exhaustive
scan's flags, ``S_s`` the screen's (rule ``screen stats``). The exhaustive scan's agreement with itself over the
six ordered pairs of seeds is the bar the screen's agreement with it must meet; at seed 0, ACC / ASR with only
``E_0`` and only ``S_0`` removed (ONNX Runtime masks, no fine-tuning). Rows are appended to
``research/results/screen_fair_test.jsonl``; the table and the decision are printed.

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/screen_fair_test.py \\
        matrix:gtsrb-preact18q-badnets-p10 matrix:gtsrb-preact18q-clean matrix:cifar10-plaincnn-clean \\
        matrix:mnist-plaincnn-badnets-p10
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from cases import cases
from cut_speed import removal
from screen_rules import exhaustive_flags, rule_flags, scores

RESULTS = Path(__file__).resolve().parent / "results" / "screen_fair_test.jsonl"
RULE = "screen stats"
MIN_FLAGS = 5           # a cell whose exhaustive scan flags fewer at seed 0 is reported, not counted
MAX_CONFIRMED = 0.30    # on the 1,200-channel cells
LARGE = 1000            # channels from which criterion (4) applies
POINTS = 2.0            # criterion (3): ACC and ASR within this many points


def recall(reference: set, other: set) -> float:
    return len(reference & other) / len(reference) if reference else 1.0


def extra(reference: set, other: set) -> float:
    return len(other - reference) / max(len(reference), 1)


def flag_sets(found: dict, seed: int) -> tuple[set, set, int, int]:
    """(exhaustive flags, screen flags, channels tested on all N by the screen, channels) of one seed's scores."""
    first, samples = found["screen_images"], found["samples"]
    exhaustive, screened, tested, total = set(), set(), 0, 0
    for name, layer in found["layers"].items():
        screen, exact = np.asarray(layer["screen"]), np.asarray(layer["exact"])
        exhaustive |= {(name, c) for c in exhaustive_flags(exact, samples)}
        flags, count = rule_flags(RULE, screen, exact, first, samples, seed)
        screened |= {(name, c) for c in flags}
        tested += count
        total += len(exact)
    return exhaustive, screened, tested, total


def as_removed(flags: set) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for layer, channel in sorted(flags):
        out.setdefault(layer, []).append(int(channel))
    return out


def measure(case, samples: int, seeds: list[int]) -> dict:
    sets = {}
    for seed in seeds:
        found = scores(case.label, str(case.model), str(case.defender), samples, seed)
        sets[seed] = flag_sets(found, seed)
    exhaustive = {s: sets[s][0] for s in seeds}
    screened = {s: sets[s][1] for s in seeds}
    pairs = list(itertools.permutations(seeds, 2))
    row = {"model": case.label, "samples": samples, "seeds": seeds, "channels": sets[seeds[0]][3],
           "exhaustive flags": [len(exhaustive[s]) for s in seeds],
           "screen flags": [len(screened[s]) for s in seeds],
           "R_E": float(np.mean([recall(exhaustive[a], exhaustive[b]) for a, b in pairs])),
           "X_E": float(np.mean([extra(exhaustive[a], exhaustive[b]) for a, b in pairs])),
           "R_S": float(np.mean([recall(exhaustive[s], screened[s]) for s in seeds])),
           "X_S": float(np.mean([extra(exhaustive[s], screened[s]) for s in seeds])),
           "C": float(np.mean([sets[s][2] / sets[s][3] for s in seeds]))}
    first = seeds[0]
    for name, flags in (("E", exhaustive[first]), ("S", screened[first])):
        acc, asr = removal(case, as_removed(flags)) if case.target is not None else (_acc(case, flags), None)
        row[f"ACC {name}_0 removed"] = round(100 * acc, 2)
        row[f"ASR {name}_0 removed"] = None if asr is None else round(100 * asr, 2)
    return row


def _acc(case, flags: set) -> float:
    """A clean twin's ACC with ``flags`` removed (no trigger to measure)."""
    from fmt_audit.backends.onnxrt.masked import MaskedModel
    from fmt_audit.data import Preprocessing
    from fmt_audit.model.loading import load_model

    model = MaskedModel(load_model(case.model).classifier, "cpu", Preprocessing(case.mean, case.std))
    return float((model.predict(case.test.x, removed=as_removed(flags)) == case.test.y).mean())


def verdict(row: dict) -> tuple[bool, list[str]]:
    """(counted, failed criteria) of one cell's row."""
    if row["exhaustive flags"][0] < MIN_FLAGS:
        return False, []
    failed = []
    if row["R_S"] < row["R_E"]:
        failed.append(f"(1) R_S {row['R_S']:.3f} < R_E {row['R_E']:.3f}")
    if row["X_S"] > row["X_E"]:
        failed.append(f"(2) X_S {row['X_S']:.3f} > X_E {row['X_E']:.3f}")
    for metric in ("ACC", "ASR"):
        e, s = row[f"{metric} E_0 removed"], row[f"{metric} S_0 removed"]
        if e is not None and abs(e - s) > POINTS:
            failed.append(f"(3) {metric} {s} with S_0 removed against {e} with E_0")
    if row["channels"] >= LARGE and row["C"] > MAX_CONFIRMED:
        failed.append(f"(4) C {row['C']:.2f} > {MAX_CONFIRMED}")
    return True, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    done = {}
    if RESULTS.exists():
        done = {(r["model"], r["samples"], tuple(r["seeds"])): r
                for r in map(json.loads, RESULTS.read_text().splitlines())}
    rows = []
    for name in args.models:
        for case in cases(name, clean=True):
            key = (case.label, args.samples, tuple(seeds))
            if key not in done:
                done[key] = measure(case, args.samples, seeds)
                with RESULTS.open("a") as out:
                    out.write(json.dumps(done[key]) + "\n")
            rows.append(done[key])
            print(json.dumps(done[key]), flush=True)
    print("\n| model | channels | E flags | S flags | R_E | R_S | X_E | X_S | C | ACC E / S removed | ASR E / S "
          "removed | counted | failed |\n|" + "---|" * 13)
    counted, passed = 0, True
    for row in rows:
        count, failed = verdict(row)
        counted += count
        passed &= not failed
        asr = ("–" if row["ASR E_0 removed"] is None
               else f"{row['ASR E_0 removed']} / {row['ASR S_0 removed']}")
        print(f"| {row['model']} | {row['channels']} | {row['exhaustive flags']} | {row['screen flags']} | "
              f"{row['R_E']:.3f} | {row['R_S']:.3f} | {row['X_E']:.3f} | {row['X_S']:.3f} | {row['C']:.2f} | "
              f"{row['ACC E_0 removed']} / {row['ACC S_0 removed']} | {asr} | {'yes' if count else 'no'} | "
              f"{'; '.join(failed) or '–'} |")
    print(f"\n{counted} cells counted; the screen {'passes' if passed and counted >= 3 else 'does not pass'}")


if __name__ == "__main__":
    main()
