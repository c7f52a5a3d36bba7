"""Does the patch evidence improve when every class's patch is fitted at the trigger's place? A development probe
after the third self-check measurement's CIFAR-10 rows (docs/research/repair-self-check.md), not a method.

On a CIFAR-10 plain CNN a 4 x 4 patch searched over the whole grid sends 90% of the images into a class that is
not the target (a natural adversarial patch, free to sit where it works best), above the target's 77.6% on a
repair that left 76.6% ASR. A BadNets trigger works at its place; so here the place is fixed first, where the
patch into the target works best on the model **as given** (the full grid search there), and then every class's
patch content is fitted at that one place on the repaired model (no choice of place for any class). Rows go to
``research/results/patch_spot_probe.jsonl``.

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/patch_spot_probe.py \\
        matrix:cifar10-plaincnn-badnets-p10-r6 --repaired repaired_patch-test_trace-fine-tuning.onnx
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def success_at(classifier, x, fit: np.ndarray, held: np.ndarray, label: int, size: int, spot: tuple[int, int],
               steps: int, seed: int) -> tuple[float, np.ndarray]:
    """A ``size`` x ``size`` opaque patch at ``spot``, content fitted (Adam on a sigmoid) to send ``x[fit]`` into
    ``label``: its success on ``x[held]`` and its content ([C, size, size] in [0, 1])."""
    import torch
    import torch.nn.functional as F
    from selfcheck_probe import predicted

    from fmt_audit.backends.torch.logits import as_logits

    r, c = spot
    content = torch.randn((1, x.shape[1], size, size), generator=torch.Generator().manual_seed(seed))
    content.requires_grad_(True)
    optimiser = torch.optim.Adam([content], lr=0.1)

    def stamped(images):
        out = images.clone()
        out[:, :, r:r + size, c:c + size] = torch.sigmoid(content)[0]
        return out

    for _ in range(steps):
        loss = F.cross_entropy(as_logits(classifier(stamped(x[fit]))), torch.full((len(fit),), label))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.inference_mode():
        return float((predicted(classifier, stamped(x[held])) == label).mean()), torch.sigmoid(content)[0].numpy()


def recheck(row: dict, pair, bridge, trainable, x, spot: tuple[int, int], size: int, train, args) -> None:
    """The fifth measurement's check of the try (docs/research/repair-self-check.md, "Fifth measurement"): the
    target's patch fitted again at the anchor on the try's model (``try_success``; it still leads where it stands out
    from the other classes' success before the try, as the library port compares), and the verdict on the try's
    model written back into the graph (``try_verdict``). The port keeps the try's model only where the patch no
    longer leads and the verdict is clean."""
    from patch_test_table import stands_out

    from fmt_audit.backends.torch.bridge import write_back
    from fmt_audit.backends.torch.logits import freeze
    from fmt_audit.repair.selfcheck import verdict_on
    from fmt_audit.verdict import VerdictConfig

    freeze(trainable)
    target, y = pair.case.target, pair.sample.y
    others = np.flatnonzero(y != target)
    hit, _ = success_at(trainable, x, others[:args.images], others[args.images:], target, size, spot, args.steps,
                        args.seed)
    references = [value for label, value in row["success"].items() if label != str(target)]
    row["try_success"], row["try_leads"] = round(hit, 4), stands_out(hit, references)
    started = time.perf_counter()
    verdict = verdict_on(pair.given, write_back(pair.repaired.proto, bridge), train, pair.preprocessing, "cpu",
                         VerdictConfig())
    row["try_verdict"] = {"verdict": verdict.verdict, "class": verdict.target_class,
                          "suspicion": None if verdict.suspicion is None else round(verdict.suspicion, 6)}
    row["try_verdict_s"] = round(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", help="matrix:CELL (one backdoored cell)")
    parser.add_argument("--repaired", required=True, help="the repaired model: a file name in the cell's folder")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images", type=int, default=16, help="fit images per class")
    parser.add_argument("--epochs", type=int, default=5, help="the stronger try's epochs (0: no try)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="rows to patch_spot_probe-TAG.jsonl")
    parser.add_argument("--recheck", action="store_true",
                        help="where A fires, check the try's model as the library port would (fifth measurement): "
                             "the target's patch fitted again at the anchor, and the verdict on it")
    args = parser.parse_args()

    import torch
    from patch_test_table import fires
    from patch_unlearning_probe import accuracy_and_asr, patch_shape, reference_classes
    from selfcheck_patch_probe import patch_success
    from selfcheck_probe import given_and_repaired

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.backends.torch.logits import freeze

    pair = given_and_repaired(args.cell, args.repaired, args.seed)
    target = pair.case.target
    x = torch.from_numpy(np.ascontiguousarray(pair.sample.x))
    y = pair.sample.y
    size, stride = patch_shape(*x.shape[2:])
    given, repaired = (BridgedClassifier(to_torch(m.classifier), pair.preprocessing, "cpu")
                       for m in (pair.given, pair.repaired))
    freeze(given)
    freeze(repaired)
    row = {"model": pair.case.label, "repaired": Path(args.repaired).name, "target": target, "size": size}
    if args.recheck:    # which training (a cell retrained on another machine is another model)
        row["given_sha256"] = hashlib.sha256(Path(pair.case.model).read_bytes()).hexdigest()[:16]
    row["acc"], row["asr"] = accuracy_and_asr(repaired, pair)
    started = time.perf_counter()
    others = np.flatnonzero(y != target)
    hit, spot, _ = patch_success(given, x, others[:args.images], others[args.images:], target, size, stride,
                                 args.steps, args.seed, 5, 8)
    row["given_success"], row["spot"] = round(hit, 4), list(spot)
    row["success"], contents = {}, {}
    for label in [target, *reference_classes(pair.repaired.num_classes, target, args.seed)]:
        rest = np.flatnonzero(y != label)
        hit, contents[label] = success_at(repaired, x, rest[:args.images], rest[args.images:], label, size, spot,
                                          args.steps, args.seed)
        row["success"][str(label)] = round(hit, 4)
        print(label, row["success"][str(label)], flush=True)
    row["search_s"] = round(time.perf_counter() - started)
    if args.epochs:
        # the stronger try (as the third measurement's): the target's patch at the anchor stamped into half of the
        # unlearning copies, true labels, the repair's recipe for --epochs from the repaired model
        from fmt_audit.data import load_npz
        from fmt_audit.repair.config import FineTuneConfig, RepairConfig
        from fmt_audit.repair.finetune import STAMP_SHARE, StampOrPerturbation, fine_tune, flip_decision

        channels, height, width = x.shape[1:]
        mask, pattern = torch.zeros((1, height, width)), torch.zeros((channels, height, width))
        mask[:, spot[0]:spot[0] + size, spot[1]:spot[1] + size] = 1
        pattern[:, spot[0]:spot[0] + size, spot[1]:spot[1] + size] = torch.from_numpy(contents[target])
        train, holdout = load_npz(pair.case.defender).split(RepairConfig().holdout, seed=args.seed)
        tuning = FineTuneConfig(epochs=args.epochs, seed=args.seed)
        bridge = to_torch(pair.repaired.classifier)
        trainable = BridgedClassifier(bridge, pair.preprocessing, "cpu")
        flip, _ = flip_decision(trainable, train, tuning.flip)
        started = time.perf_counter()
        fine_tune(trainable, train, tuning, flip, holdout,
                  perturb=StampOrPerturbation(lambda batch: batch, [(mask, pattern)], STAMP_SHARE, seed=args.seed))
        row["try_s"] = round(time.perf_counter() - started)
        trainable.module.eval()
        row["try_acc"], row["try_asr"] = accuracy_and_asr(trainable, pair)
        if args.recheck and fires(row, "P2"):
            recheck(row, pair, bridge, trainable, x, spot, size, train, args)
    print(json.dumps(row), flush=True)
    name = f"patch_spot_probe-{args.tag}.jsonl" if args.tag else "patch_spot_probe.jsonl"
    with (RESULTS / name).open("a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
