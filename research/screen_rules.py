"""Issue 32: which statistics let a screened scan flag what the exhaustive one does?

For each model, the mask test of every channel on the first N/4 images (the screen) and on all N images (the
exhaustive scan), both cached under ``~/.cache/fmt-audit/research/screen_rules/``; then, offline, each rule
below is scored against the exhaustive scan's flags (the outlier rule at 3.5 on the exact scores): recall
(its flags also flagged), extra (flags it did not make, as a share of its flags), and the share of channels
a rule would have tested on all N images.

* ``screen stats``: the layer's median and scale from the screen, the scale with the smaller sample's extra
  binomial noise taken out; confirmed channels flagged on their exact scores (the rule ``--budget fast``
  had in commit 5bcd48b);
* ``merged stats``: the outlier rule on the confirmed channels' exact scores and the others' screened ones;
* ``reference R``: median and scale from R seeded random channels of the layer tested on all N (plus the
  confirmed ones flagged on exact scores).

    cd benchmarks && PYTHONPATH=. OMP_NUM_THREADS=1 python ../research/screen_rules.py \\
        matrix:cifar10-preact18q-badnets-p10,cifar10-vgg-badnets-p10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from cases import model_paths, normalisation

CACHE = Path.home() / ".cache" / "fmt-audit" / "research" / "screen_rules"
THRESHOLD = 3.5
SCREEN_SHARE = 4            # the screen runs on the first 1/SCREEN_SHARE of the images, at least 32
SCREEN_MIN_IMAGES = 32
CONFIRM_MARGIN = 2.0        # channels the screen puts within this of the threshold are tested on all N


def screen_size(samples: int) -> int:
    return max(SCREEN_MIN_IMAGES, samples // SCREEN_SHARE)


def scores(label: str, model: str, defender: str, samples: int, seed: int) -> dict:
    """Per layer: the suspicion (row max of the shift) of every channel on the screen and on all N."""
    path = CACHE / f"{label.replace(' ', '_')}_n{samples}_seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    from fmt_audit.data import load_npz
    from fmt_audit.fmt.mask import MaskTestConfig, MaskTester
    from fmt_audit.fmt.scan import ScanConfig, _Scanner
    from fmt_audit.model.loading import load_model

    mean, std = normalisation(Path(model))
    loaded = load_model(model)
    config = ScanConfig(samples=samples, seed=seed, device="cpu", mean=mean, std=std)
    data = load_npz(defender).take(samples, seed=seed)
    scanner = _Scanner(loaded, data, config, list(loaded.layers))
    first = screen_size(len(data))
    full = scanner.tester()
    screen = MaskTester(scanner.masked, data.x[:first], data.y[:first], scanner.num_classes,
                        MaskTestConfig(config.gain, scanner.plan.candidate_batch))
    out = {"screen_images": first, "samples": len(data), "layers": {}}
    for layer in loaded.layers:
        out["layers"][layer.name] = {"screen": screen.score_layer(layer).shift.max(axis=1).tolist(),
                                     "exact": full.score_layer(layer).shift.max(axis=1).tolist()}
        print(layer.name, flush=True, file=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def exhaustive_flags(exact: np.ndarray, samples: int) -> set[int]:
    from fmt_audit.fmt.selection import select_outliers

    return set(select_outliers(exact, THRESHOLD, samples).flagged)


def rule_flags(rule: str, screen: np.ndarray, exact: np.ndarray, first: int, samples: int,
               seed: int) -> tuple[set[int], int]:
    """(flags, channels tested on all N) of ``rule``."""
    from fmt_audit.fmt.selection import MAD_TO_SIGMA, robust_z, select_outliers

    confirmed = np.flatnonzero(robust_z(screen, first) > THRESHOLD - CONFIRM_MARGIN)
    if rule == "screen stats":
        median = float(np.median(screen))
        spread = MAD_TO_SIGMA * float(np.median(np.abs(screen - median)))
        p = min(max(median, 1 / samples), 1 - 1 / samples)
        scale = max(np.sqrt(max(spread ** 2 - p * (1 - p) * (1 / first - 1 / samples), 0.0)),
                    np.sqrt(p * (1 - p) / samples), 1e-12)
        z = (exact[confirmed] - median) / scale
        return set(confirmed[z > THRESHOLD].tolist()), len(confirmed)
    if rule == "merged stats":
        merged = screen.copy()
        merged[confirmed] = exact[confirmed]
        return set(select_outliers(merged, THRESHOLD, samples).flagged) & set(confirmed.tolist()), len(confirmed)
    if rule.startswith("reference"):
        count = int(rule.split()[1])
        rng = np.random.default_rng(seed)
        reference = rng.choice(len(exact), size=min(count, len(exact)), replace=False)
        values = exact[reference]
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median)))
        p = min(max(median, 1 / samples), 1 - 1 / samples)
        scale = max(MAD_TO_SIGMA * mad, np.sqrt(p * (1 - p) / samples), 1e-12)
        tested = set(confirmed.tolist()) | set(reference.tolist())
        z = (exact[confirmed] - median) / scale
        return set(confirmed[z > THRESHOLD].tolist()), len(tested)
    raise ValueError(rule)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rules", default="screen stats,merged stats,reference 32,reference 64")
    # written up in docs/research/screening.md
    args = parser.parse_args()
    print("| model | rule | exhaustive flags | flags | recall | extra | tested on all N |")
    print("|---|---|---|---|---|---|---|")
    for label, model, defender in (c for name in args.models for c in model_paths(name)):
        found = scores(label, str(model), str(defender), args.samples, args.seed)
        first, samples = found["screen_images"], found["samples"]
        for rule in args.rules.split(","):
            base, got, tested, total = set(), set(), 0, 0
            for name, layer in found["layers"].items():
                screen, exact = np.asarray(layer["screen"]), np.asarray(layer["exact"])
                want = {(name, c) for c in exhaustive_flags(exact, samples)}
                flags, count = rule_flags(rule, screen, exact, first, samples, args.seed)
                base |= want
                got |= {(name, c) for c in flags}
                tested += count
                total += len(exact)
            recall = len(got & base) / len(base) if base else 1.0
            extra = len(got - base) / max(len(base), 1)
            print(f"| {label} | {rule} | {len(base)} | {len(got)} | {recall:.3f} | {extra:.3f} | "
                  f"{tested} of {total} ({tested / total:.0%}) |", flush=True)


if __name__ == "__main__":
    main()
