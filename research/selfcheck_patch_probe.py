"""Does an opaque square patch, placed on a grid and its content optimised, still send images into a class after
the repair? A development probe for the self-check (docs/research/repair-self-check.md), not a method.

On the failed repair (CIFAR-10 plain CNN BadNets) the real 3 x 3 patch (0.9% of the pixels) still sends about
half the images to the target, while Neural Cleanse's search ends at a mask of 2.0-3.4% there, no smaller than
the other classes': the search's optimum is not the smallest trigger. Here the trigger's shape is fixed
instead: a ``size`` x ``size`` patch, opaque, at each position of a grid of stride ``stride`` (any square
trigger of side ``size - stride + 1`` or less lies inside one of them), its content optimised (Adam on a
sigmoid, ``steps`` steps, all positions at once) to send ``fit`` images of other classes into the class; the
best position's success on ``held`` images of other classes. Per class, on the model as given and a repaired
one; rows go to ``research/results/selfcheck_patch_probe.jsonl``.

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/selfcheck_patch_probe.py \\
        matrix:cifar10-plaincnn-badnets-p10-r3 --repaired repaired_strip-main_trace-unlearning-self-checked.onnx
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def patch_success(classifier, x, fit: np.ndarray, held: np.ndarray, label: int, size: int, stride: int,
                  steps: int, seed: int, coarse: int | None = None, keep: int = 8,
                  ) -> tuple[float, tuple[int, int], np.ndarray]:
    """The best grid position's success into ``label`` on ``x[held]``, where it is (row, column) and its
    content ([C, size, size], in [0, 1]). ``coarse``: after that many steps only the ``keep`` positions of
    lowest loss go on (a fifth of the cost at 5 of 30 steps on a 225-position grid); ``None``: all of them."""
    import torch
    import torch.nn.functional as F
    from selfcheck_probe import predicted

    from fmt_audit.backends.torch.logits import as_logits

    _, channels, height, width = x.shape
    rows, columns = (sorted({*range(0, side - size + 1, stride), side - size}) for side in (height, width))
    spots = [(r, c) for r in rows for c in columns]     # the last row and column too: the borders are covered
    generator = torch.Generator().manual_seed(seed)
    content = torch.randn((len(spots), channels, size, size), generator=generator).requires_grad_(True)

    def stamped(images: torch.Tensor, patch: torch.Tensor, spot: tuple[int, int]) -> torch.Tensor:
        """``images`` with ``patch`` ([C, size, size]) at ``spot``."""
        r, c = spot
        out = images.clone()
        out[:, :, r:r + size, c:c + size] = patch
        return out

    optimiser = torch.optim.Adam([content], lr=0.1)
    x_fit = x[fit]
    for step in range(steps):
        patches = torch.sigmoid(content)
        batch = torch.cat([stamped(x_fit, patches[i], spot) for i, spot in enumerate(spots)])   # spot-major
        target = torch.full((len(batch),), label)
        losses = F.cross_entropy(as_logits(classifier(batch)), target, reduction="none")
        optimiser.zero_grad()
        losses.mean().backward()
        optimiser.step()
        if coarse is not None and step + 1 == coarse and len(spots) > keep:
            kept = torch.argsort(losses.detach().view(len(spots), len(fit)).mean(1))[:keep].tolist()
            spots = [spots[i] for i in kept]
            content = content.detach()[kept].clone().requires_grad_(True)
            optimiser = torch.optim.Adam([content], lr=0.1)
    with torch.inference_mode():
        patches, x_held = torch.sigmoid(content), x[held]
        hits = [float((predicted(classifier, stamped(x_held, patches[i], spot)) == label).mean())
                for i, spot in enumerate(spots)]
    best = int(np.argmax(hits))
    return hits[best], spots[best], patches[best].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", help="matrix:CELL (one backdoored cell)")
    parser.add_argument("--repaired", required=True, help="the repaired model: a file name in the cell's folder")
    parser.add_argument("--size", type=int, default=4)     # the rows of the page: 4 x 4, stride 2
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=16, help="fit images per class searched")
    parser.add_argument("--classes", default="all", help="'all', 'target' or a list: 0,3")
    parser.add_argument("--models", default="given,repaired", help="which of the pair to search")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from selfcheck_probe import given_and_repaired

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.backends.torch.logits import freeze

    pair = given_and_repaired(args.cell, args.repaired, args.seed)
    case, target = pair.case, pair.case.target
    x = torch.from_numpy(np.ascontiguousarray(pair.sample.x))
    y = pair.sample.y
    classes = (range(pair.given.num_classes) if args.classes == "all" else [target] if args.classes == "target"
               else [int(c) for c in args.classes.split(",")])
    row = {"model": case.label, "repaired": Path(args.repaired).name, "target": target, "size": args.size,
           "stride": args.stride, "steps": args.steps, "images": args.images, "models": {}}
    for name, loaded in (("given", pair.given), ("repaired", pair.repaired)):
        if name not in args.models.split(","):
            continue
        torch.manual_seed(args.seed)
        classifier = BridgedClassifier(to_torch(loaded.classifier), pair.preprocessing, "cpu")
        freeze(classifier)
        figures = {}
        for label in classes:
            others = np.flatnonzero(y != label)
            started = time.perf_counter()
            success, spot, _ = patch_success(classifier, x, others[:args.images], others[args.images:], label,
                                          args.size, args.stride, args.steps, args.seed)
            seconds = round(time.perf_counter() - started)
            figures[str(label)] = {"success": round(success, 4), "spot": spot, "s": seconds}
            print(name, label, figures[str(label)], flush=True)
        row["models"][name] = figures
    with (RESULTS / "selfcheck_patch_probe.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
