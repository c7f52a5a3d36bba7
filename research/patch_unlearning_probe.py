"""After a repair: does a small opaque patch still lead into the target, and does unlearning that patch remove
what is left? A development probe for the self-check and its stronger try (docs/research/repair-self-check.md),
not a method.

The patch probe (``selfcheck_patch_probe.py``) found the failed repair's survivor where Neural Cleanse did not:
a 4 x 4 patch searched on a grid reached 98.6% into the target, at the real trigger's place, against at most
68.6% into any other class. Two questions before a test is written:

1. **Evidence.** With the patch's side a share of the image's (``ceil(side / 8)``: 4 on CIFAR-10 and GTSRB, 4
   on MNIST, 2 on 16-pixel images; stride half of it), the target's best success on the repaired model against
   the other classes' (all of them up to ten classes; a seeded sample of nine on larger tasks): its lead over
   the best other class and over their median.
2. **The stronger try.** The repaired model fine-tuned again (the repair's recipe, ``--epochs``) with half of
   its unlearning copies stamped with the target's best patch at its place, true labels: the real trigger's ASR
   and clean accuracy before and after, on the cell's test images.

Rows go to ``research/results/patch_unlearning_probe.jsonl`` (``-TAG`` before ``.jsonl`` with ``--tag``).

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/patch_unlearning_probe.py \\
        matrix:cifar10-plaincnn-badnets-p10-r3 --repaired repaired_patch-dev-a_trace-unlearning-self-checked.onnx
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def patch_shape(height: int, width: int) -> tuple[int, int]:
    """The patch's side (an eighth of the image's shorter side, rounded up) and the grid's stride (half of it)."""
    size = math.ceil(min(height, width) / 8)
    return size, max(1, size // 2)


def reference_classes(classes: int, target: int, seed: int, most: int = 9) -> list[int]:
    """The classes the target is compared with: all the others, or a seeded sample of ``most`` of them."""
    others = [c for c in range(classes) if c != target]
    if len(others) <= most:
        return others
    return sorted(np.random.default_rng([seed, classes]).choice(others, most, replace=False).tolist())


def accuracy_and_asr(classifier, pair) -> tuple[float, float | None]:
    """Clean accuracy on the cell's test images and the real trigger's success on the triggered ones."""
    import torch
    from selfcheck_probe import predicted

    case = pair.case
    acc = float((predicted(classifier, torch.from_numpy(np.ascontiguousarray(case.test.x))) == case.test.y).mean())
    asr = None if pair.triggered is None else float((predicted(classifier, pair.triggered) == case.target).mean())
    return acc, asr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", help="matrix:CELL (one backdoored cell)")
    parser.add_argument("--repaired", required=True, help="the repaired model: a file name in the cell's folder")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=16, help="fit images per class searched")
    parser.add_argument("--coarse", type=int, default=None, help="steps before only --keep positions go on")
    parser.add_argument("--keep", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5, help="the stronger try's epochs (0: no try)")
    parser.add_argument("--on", choices=("repaired", "given"), default="repaired",
                        help="search the repaired model or, for reference, the model as given (no try then)")
    parser.add_argument("--target-only", action="store_true", help="search the target alone (no evidence)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="rows to patch_unlearning_probe-TAG.jsonl")
    parser.add_argument("--hold-removed", action="store_true",
                        help="the try holds the repaired model's removed channels (all-zero filters) at zero, as "
                             "the library's pipeline does (fmt_audit/repair/pipeline.py); not the registered try")
    args = parser.parse_args()

    import torch
    from selfcheck_patch_probe import patch_success
    from selfcheck_probe import given_and_repaired

    from fmt_audit.backends.torch.bridge import BridgedClassifier, channels_held_at_zero, to_torch
    from fmt_audit.backends.torch.logits import freeze
    from fmt_audit.data import load_npz
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig
    from fmt_audit.repair.finetune import STAMP_SHARE, StampOrPerturbation, fine_tune, flip_decision

    pair = given_and_repaired(args.cell, args.repaired, args.seed)
    case, target = pair.case, pair.case.target
    x = torch.from_numpy(np.ascontiguousarray(pair.sample.x))
    y = pair.sample.y
    _, channels, height, width = x.shape
    size, stride = patch_shape(height, width)
    torch.manual_seed(args.seed)
    searched = pair.repaired if args.on == "repaired" else pair.given
    classifier = BridgedClassifier(to_torch(searched.classifier), pair.preprocessing, "cpu")
    freeze(classifier)
    row = {"model": case.label, "repaired": Path(args.repaired).name, "on": args.on, "target": target, "size": size,
           "stride": stride, "steps": args.steps, "images": args.images, "coarse": args.coarse, "keep": args.keep}
    row["acc"], row["asr"] = accuracy_and_asr(classifier, pair)
    started = time.perf_counter()
    classes = [target] + ([] if args.target_only else reference_classes(pair.repaired.num_classes, target, args.seed))
    found = {}
    for label in classes:
        others = np.flatnonzero(y != label)
        found[label] = patch_success(classifier, x, others[:args.images], others[args.images:], label, size, stride,
                                     args.steps, args.seed, args.coarse, args.keep)
        print(label, round(found[label][0], 4), found[label][1], flush=True)
    row["search_s"] = round(time.perf_counter() - started)
    row["success"] = {str(label): round(hit[0], 4) for label, hit in found.items()}
    row["spot"] = list(found[target][1])
    if len(classes) > 1:
        rest = [found[label][0] for label in classes[1:]]
        row["lead_max"] = round(found[target][0] - max(rest), 4)
        row["lead_median"] = round(found[target][0] - float(np.median(rest)), 4)
    if args.epochs and args.on == "repaired":
        # the stronger try: the target's patch at its place stamped into half of the unlearning copies
        _, spot, content = found[target]
        mask = torch.zeros((1, height, width))
        mask[:, spot[0]:spot[0] + size, spot[1]:spot[1] + size] = 1
        pattern = torch.zeros((channels, height, width))
        pattern[:, spot[0]:spot[0] + size, spot[1]:spot[1] + size] = torch.from_numpy(content)
        train, holdout = load_npz(case.defender).split(RepairConfig().holdout, seed=args.seed)
        tuning = FineTuneConfig(epochs=args.epochs, seed=args.seed)
        bridge = to_torch(pair.repaired.classifier)
        trainable = BridgedClassifier(bridge, pair.preprocessing, "cpu")
        flip, _ = flip_decision(trainable, train, tuning.flip)
        removed = {layer.name: [c for c in range(layer.out_channels)
                                if not bridge.conv_weights(layer.name).weight[c].any()]
                   for layer in pair.repaired.layers} if args.hold_removed else {}
        if args.hold_removed:
            row["held"] = sum(map(len, removed.values()))
        started = time.perf_counter()
        with channels_held_at_zero(bridge.channel_modules, removed):
            fine_tune(trainable, train, tuning, flip, holdout,
                      perturb=StampOrPerturbation(lambda batch: batch, [(mask, pattern)], STAMP_SHARE,
                                                  seed=args.seed))
        row["try_s"] = round(time.perf_counter() - started)
        trainable.module.eval()
        row["try_acc"], row["try_asr"] = accuracy_and_asr(trainable, pair)
    print(json.dumps(row), flush=True)
    name = f"patch_unlearning_probe-{args.tag}.jsonl" if args.tag else "patch_unlearning_probe.jsonl"
    with (RESULTS / name).open("a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
