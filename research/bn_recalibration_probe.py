"""Development probe (issue 31, the repair's accuracy cost): does re-estimating BatchNorm's running statistics
on the clean training images after the repair give back accuracy?

Unlearning trains each batch together with its perturbed copies (feature-map perturbations, stamped images) in
BatchNorm's training mode, so the running statistics the repaired model keeps are those of half clean, half
perturbed batches; the model is then used on clean images. This probe takes a repaired model kept by
``trace_repair.py --keep-models``, re-estimates the running mean and variance of every BatchNorm on the repair's
training split (1,800 clean images, no augmentation, cumulative average over batches of 64) and reports ACC and
ASR before and after, in torch, on the cell's test images. Nothing in the library changes with it.

Result (twenty-sixth session, dropped after one development model): on gtsrb-preact18q-badnets-p10-r6's
self-checked repair (9 BatchNorms) ACC 99.01% -> 97.40% recalibrated (given 99.94%), ASR 0.0% both: the weights
were tuned under the mixed batches' statistics, and clean ones fit them worse.

    cd benchmarks && PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/bn_recalibration_probe.py \\
        matrix:gtsrb-preact18q-badnets-p10-r6 repaired_patch-test_trace-unlearning-self-checked.onnx
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def recalibrated(classifier, images: np.ndarray, batch: int = 64) -> int:
    """Re-estimate every BatchNorm's running statistics of ``classifier`` (a bridged model) on ``images``
    (cumulative average); how many there are."""
    module = classifier.module
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    module.eval()
    for m in norms:
        m.train()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            part = images[i:i + batch]
            if len(part) > 1:
                classifier(torch.from_numpy(part))
    for m, (momentum, training) in zip(norms, saved, strict=True):
        m.momentum = momentum
        m.train(training)
    module.eval()
    return len(norms)


def main() -> None:
    from cases import cases

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.data import Preprocessing, load_npz
    from fmt_audit.model.loading import load_model
    from fmt_audit.repair.config import RepairConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case")
    parser.add_argument("repaired", help="file name beside the cell's model.onnx")
    args = parser.parse_args()
    (case,) = cases(args.case)
    folder = case.model.parent
    train, _ = load_npz(case.defender).split(RepairConfig().holdout, seed=0)
    preprocessing = Preprocessing(case.mean, case.std)
    victims = case.test.y != case.target

    def figures(classifier) -> tuple[float, float]:
        acc = classifier.accuracy(case.test)
        with torch.no_grad():
            predicted = np.concatenate([classifier(torch.from_numpy(case.triggered[victims][i:i + 256])).argmax(1)
                                        .numpy() for i in range(0, int(victims.sum()), 256)])
        return round(acc, 4), round(float((predicted == case.target).mean()), 4)

    row = {"model": case.label, "repaired": args.repaired}
    for name, path in (("given", case.model), ("repaired", folder / args.repaired)):
        classifier = BridgedClassifier(to_torch(load_model(path).proto), preprocessing, "cpu")
        classifier.module.eval()
        row[name] = figures(classifier)
        if name == "repaired":
            row["norms"] = recalibrated(classifier, train.x)
            row["recalibrated"] = figures(classifier)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
