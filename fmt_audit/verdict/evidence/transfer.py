"""Does a class's universal perturbation move clean networks too? The transfer of the universal ladder to
reference networks, evidence of the ``combined`` verdict.

The universal-perturbation ladder (:mod:`fmt_audit.verdict.evidence.universal`) finds the class that is
easiest to reach. In a backdoored model that is usually the target, but in a clean model it can be a natural
attractor class (MNIST's 8, CIFAR-10's 6). The two differ in where the shortcut lives. A natural universal
perturbation exploits features of the data, so it moves other networks trained on the same data too:
universal perturbations are known to transfer between models (Moosavi-Dezfooli et al., CVPR 2017). A
backdoor is a feature of the poisoned model; what reverse engineering recovers of a trigger moves the model,
not clean networks.

So the ladder's last-rung perturbations are applied to a few small networks trained from scratch on the
verdict's own labelled images (:mod:`fmt_audit.verdict.evidence.reference`), on the same held-out images.

Cost: training the references (``count x steps`` small CNN steps of ``batch`` images, on CPU) and two forward
passes per reference of every held-out image per class. The references depend only on the images and the
recipe, not on the audited model: a :class:`ReferenceCache` passed from one audit to the next (a fleet on one
data file) trains them once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from fmt_audit.data import Dataset
from fmt_audit.verdict.config import ReferenceConfig
from fmt_audit.verdict.evidence.reference import ReferenceClassifier, train_reference
from fmt_audit.verdict.evidence.universal import UniversalLadder, held_out_effect


@dataclass(frozen=True)
class TransferResult:
    """Per reference network, every class's held-out success with the ladder's last perturbations and
    without them (:func:`fmt_audit.verdict.evidence.universal.held_out_effect`)."""

    reference_success: list[list[float]]    # [reference][class]
    reference_baseline: list[list[float]]   # [reference][class]


class ReferenceCache:
    """Trained reference sets by data and recipe, the last ``kept`` of them (a few sets of three small CNNs:
    a few MiB). Training is deterministic on CPU for a seed, so a set handed out again is the one a fresh
    training gives."""

    def __init__(self, kept: int = 4):
        self.kept = kept
        self._sets: dict[tuple, list[ReferenceClassifier]] = {}

    def get(self, key: tuple, train) -> list[ReferenceClassifier]:
        if key not in self._sets:
            if len(self._sets) >= self.kept:
                del self._sets[next(iter(self._sets))]
            self._sets[key] = train()
        return self._sets[key]


def trained_references(dataset: Dataset, classes: int, device: str = "cpu", config: ReferenceConfig | None = None,
                       seed: int = 0, cache: ReferenceCache | None = None) -> list[ReferenceClassifier]:
    """The ``config.count`` references trained on ``dataset`` from seeds ``seed, seed + 1, ...``
    (:func:`fmt_audit.verdict.evidence.reference.train_reference`), from ``cache`` when it holds them."""
    config = config or ReferenceConfig()

    def train() -> list[ReferenceClassifier]:
        return [train_reference(dataset, classes, device, config, seed + i) for i in range(config.count)]

    if cache is None:
        return train()
    digest = hashlib.sha256()
    for part in (dataset.x, dataset.y):
        if part is not None:
            digest.update(f"{part.shape}{part.dtype}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
    return cache.get((digest.hexdigest(), classes, device, config, seed), train)


def transfer_to_references(ladder: UniversalLadder, dataset: Dataset, classes: int, device: str = "cpu",
                           config: ReferenceConfig | None = None, seed: int = 0, batch: int = 512,
                           cache: ReferenceCache | None = None) -> TransferResult:
    """The ``config.count`` references of ``dataset`` (the ladder's images, float NCHW in [0, 1] with labels;
    :func:`trained_references`) and, per reference, each class's held-out success with the ladder's last
    perturbations and with none."""
    x = torch.from_numpy(np.ascontiguousarray(dataset.x, dtype=np.float32)).to(device)
    delta = torch.from_numpy(ladder.perturbations).to(device)
    success, baseline = [], []
    for reference in trained_references(dataset, classes, device, config, seed, cache):
        moved, _ = held_out_effect(reference, x, ladder.held, delta, batch)
        before, _ = held_out_effect(reference, x, ladder.held, torch.zeros_like(delta), batch)
        success.append([round(float(v), 6) for v in moved])
        baseline.append([round(float(v), 6) for v in before])
    return TransferResult(success, baseline)
