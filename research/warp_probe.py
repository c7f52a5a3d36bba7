"""Can a smooth-warp search find a WaNet target the combined verdict misses? (issue 31; development probe)

The combined verdict reverses patch triggers (Neural Cleanse) and universal additive perturbations; a warping
trigger (WaNet: a fixed smooth flow field, a fraction of a pixel to a pixel per pixel) is neither, and the
verdict called all three matrix WaNet models clean. Here, for every class t, a flow field of the trigger's own
family (a k x k grid of displacements, upsampled bicubically to the image, at most ``budget`` pixels) is
optimised so that the warped images of the other classes go to t; its success on held-out images per class, at
a few budgets. A warp target should stand out from the other classes as a patch target does in Neural Cleanse.
A diagnostic on development models: nothing in the product reads it.

    cd benchmarks && PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/warp_probe.py matrix:mnist-lenet-wanet-p10-r2
    (--clean for the clean twins; rows appended to research/results/warp_probe.jsonl)
    ... python ../research/warp_probe.py population:cifar10:clean,warp:0-6

``population:DATASET:GROUPS:FIRST-END``: research/verdict_population.py's models (built there when missing:
three small architectures in turn, random targets, 5% or 10% poisoning; its ``warp`` is a fixed smooth field
of at most 0.15 of the half-width, without WaNet's noise mode), inputs in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from cases import cases

RESULTS = Path(__file__).resolve().parent / "results" / "warp_probe.jsonl"


def warp_success(classifier, x, y, classes: int, budget: float, grid: int, steps: int, images: int,
                 seed: int) -> list[float]:
    """Per class t: the share of held-out other-class images that the best ``grid`` x ``grid`` flow field (at most
    ``budget`` pixels per pixel, fitted on up to ``images`` other-class images) sends to t."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    fit_pool, held_pool = order[: len(order) // 2], order[len(order) // 2:]
    h, w = x.shape[2:]
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    identity = torch.stack((cols, rows), -1)[None]
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])     # pixels -> grid_sample's units

    def warped(images, theta):
        flow = F.interpolate(budget * torch.tanh(theta), size=(h, w), mode="bicubic", align_corners=True)
        field = identity + flow.permute(0, 2, 3, 1) * scale
        return F.grid_sample(images, field.expand(len(images), -1, -1, -1), mode="bilinear",
                             padding_mode="border", align_corners=True)

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    generator = torch.Generator().manual_seed(seed)
    success = []
    for t in range(classes):
        fit = fit_pool[y[fit_pool] != t][:images]
        held = held_pool[y[held_pool] != t]
        theta = (0.1 * torch.randn((1, 2, grid, grid), generator=generator)).requires_grad_(True)
        optimiser = torch.optim.Adam([theta], lr=0.1)
        target = torch.full((len(fit),), t, dtype=torch.long)
        for _ in range(steps):
            optimiser.zero_grad()
            loss = F.cross_entropy(classifier(warped(xt[fit], theta)), target)
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            hits = 0
            for start in range(0, len(held), 512):
                batch = xt[held[start:start + 512]]
                hits += int((classifier(warped(batch, theta)).argmax(1) == t).sum())
        success.append(round(hits / max(1, len(held)), 4))
    return success


def models(name: str, clean: bool):
    """benchmarks/cases.py's cases, or research/verdict_population.py's models as cases (no test images)."""
    if not name.startswith("population:"):
        yield from cases(name, clean=clean)
        return
    from cases import Case
    from verdict_population import build, folder_of, load_task

    _, dataset, groups, numbers = name.split(":")
    first, end = (int(n) for n in numbers.split("-"))
    task = load_task(dataset)
    for group in groups.split(","):
        for number in range(first, end):
            facts = build(group, number, task)
            folder = folder_of(group, number, dataset)
            label = f"population {dataset} {group}_{number:02d} ({facts['architecture']}, ACC {facts['acc']:.3f}" + (
                f", ASR {facts['asr']:.3f})" if "asr" in facts else ")")
            yield Case(label, folder / "model.onnx", folder / "defender.npz", facts.get("target"), None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models")
    parser.add_argument("--clean", action="store_true")
    parser.add_argument("--budgets", default="0.5,1,2")
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--samples", type=int, default=512, help="defender images used (fit half, held-out half)")
    parser.add_argument("--skip-done", action="store_true", help="skip the models that have a row already")
    args = parser.parse_args()
    import torch

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.data import Preprocessing, load_npz
    from fmt_audit.model.loading import load_model

    torch.set_num_threads(1)
    done = {json.loads(line)["model"] for line in RESULTS.read_text().splitlines()} if RESULTS.exists() else set()
    for case in models(args.models, args.clean):
        if args.skip_done and case.label in done:
            continue
        loaded = load_model(case.model)
        classifier = BridgedClassifier(to_torch(loaded.classifier), Preprocessing(case.mean, case.std), "cpu")
        classifier.module.eval()
        for p in classifier.module.parameters():
            p.requires_grad_(False)
        train = load_npz(case.defender)
        if case.label.startswith("matrix"):     # the matrix studies' training split
            train, _ = train.split(0.1, seed=0)
        pick = np.sort(np.random.default_rng(0).choice(len(train), size=min(args.samples, len(train)),
                                                       replace=False))
        x, y = train.x[pick], train.y[pick]
        classes = int(loaded.classifier.graph.output[0].type.tensor_type.shape.dim[-1].dim_value or y.max() + 1)
        row = {"model": case.label, "target": case.target, "grid": args.grid, "steps": args.steps,
               "images": args.images, "samples": len(x), "per budget": {}}
        started = time.time()
        for budget in [float(b) for b in args.budgets.split(",")]:
            success = warp_success(classifier, x, y, classes, budget, args.grid, args.steps, args.images, seed=0)
            top = int(np.argmax(success))
            others = np.median([s for k, s in enumerate(success) if k != top])
            row["per budget"][str(budget)] = {"success": success, "top": top, "top success": success[top],
                                              "median of the others": round(float(others), 4)}
        row["time s"] = round(time.time() - started, 1)
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
