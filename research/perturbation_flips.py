"""Where the repair's unlearning copies go (docs/research/repair-clean-tail.md): the share of FMT's feature-map
perturbations (``FeatureMapPerturbation``, the repair's radius and steps) that change the model's prediction,
and the classes they change it to, on batches of the cell's defender images. A diagnostic, not a method: if the
copies went to the backdoor's target, the unlearning would be specific to it; if they scatter, it is adversarial
training.

    cd benchmarks && PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/perturbation_flips.py \\
        matrix:cifar10-plaincnn-badnets-p10 0.045
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
from cases import cases


def main() -> None:
    import torch

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.data import Preprocessing, load_npz
    from fmt_audit.fmt.gradient import FeatureMapPerturbation
    from fmt_audit.model.loading import load_model

    (case,) = list(cases(sys.argv[1]))
    eps = float(sys.argv[2])
    loaded = load_model(case.model)
    classifier = BridgedClassifier(to_torch(loaded.classifier), Preprocessing(case.mean, case.std), "cpu")
    classifier.module.eval()
    train, _ = load_npz(case.defender).split(0.1, seed=0)
    perturb = FeatureMapPerturbation(classifier, loaded.layers, eps, eps / 3, 5, seed=0)
    rng = np.random.default_rng(0)
    flips, copies, flipped = Counter(), 0, 0
    for _ in range(8):
        x = torch.from_numpy(np.ascontiguousarray(train.x[rng.choice(len(train), 128, replace=False)]))
        with torch.no_grad():
            clean = classifier(x).argmax(1).numpy()
            moved = classifier(perturb(x)).argmax(1).numpy()
        changed = moved != clean
        copies, flipped = copies + len(x), flipped + int(changed.sum())
        flips.update(moved[changed].tolist())
    print(json.dumps({"cell": case.label, "target": case.target, "eps": eps, "copies": copies, "flipped": flipped,
                      "flip classes": dict(flips.most_common())}))


if __name__ == "__main__":
    main()
