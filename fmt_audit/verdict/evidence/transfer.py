"""Is the class the margin test singles out easy because of the data or because of this model? The transfer
test, evidence for the model-level verdict.

The maximum-margin test (:mod:`fmt_audit.verdict.margin`) and the universal-perturbation ladder
(:mod:`fmt_audit.verdict.evidence.universal`) find the class that is easiest to reach. In a backdoored model that is usually
the target, but in a clean model it can be a natural attractor class (MNIST's 8, CIFAR-10's 6), which neither
test alone tells apart (benchmarks/README.md, Verdict). The two differ in where the shortcut lives. A natural
universal perturbation exploits features of the data, so it moves other networks trained on the same data
too: universal perturbations are known to transfer between models (Moosavi-Dezfooli et al., CVPR 2017). A
backdoor is a feature of the poisoned model; what reverse engineering recovers of a trigger moves the model,
not clean networks.

So the ladder's last-rung perturbations are applied to a few small networks trained from scratch on the
scan's own labelled images (:mod:`fmt_audit.verdict.evidence.reference`), on the same held-out images, and each class's
transfer is the share they move into it beyond what the references already put there
(:func:`fmt_audit.verdict.transferred`). The verdict (:func:`fmt_audit.verdict.transfer_verdict`) discounts
the margin test's ``1 - p`` by the transfer at its class. The median margins of the same images, in the model
and in the references, give the shortcut verdict (:func:`fmt_audit.verdict.shortcut_verdict`), which asks the
question of every class.

Cost: the universal ladder's, plus training the references (``count x steps`` small CNN steps of ``batch``
images, on CPU) and two forward passes per reference of every held-out image per class.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch

from fmt_audit.backends.torch.bridge import TorchBridge
from fmt_audit.backends.torch.logits import logit_classifier
from fmt_audit.data import Dataset, Preprocessing
from fmt_audit.model.graph import ImageInput
from fmt_audit.verdict import MarginConfig, ReferenceConfig, UniversalConfig
from fmt_audit.verdict.evidence.reference import ReferenceClassifier, train_reference
from fmt_audit.verdict.evidence.universal import UniversalLadder, held_out_effect, universal_ladder
from fmt_audit.verdict.margin import max_margins

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferResult:
    """The ladder on the audited model and, per reference network, every class's held-out success and median
    margin with the ladder's last perturbations and without them (:func:`fmt_audit.verdict.evidence.universal.held_out_effect`)."""

    ladder: UniversalLadder
    reference_success: list[list[float]]    # [reference][class]
    reference_baseline: list[list[float]]   # [reference][class]
    reference_margin: list[list[float]]     # [reference][class]
    reference_margin_baseline: list[list[float]]    # [reference][class]
    margins: list[float] | None = None      # the maximum-margin test's, per class, when it was asked for

    @property
    def margin_figures(self) -> dict:
        """The median margins, as :func:`fmt_audit.verdict.shortcut_verdict` takes them and reports carry them."""
        return {"held_out_margin": list(self.ladder.held_out_margin), "reference_margin": self.reference_margin,
                "reference_margin_baseline": self.reference_margin_baseline}


# Trained reference sets by data and recipe, oldest first: a process that audits many models on one data
# file (a fleet) trains them once. A few sets of three small CNNs: a few MiB at most.
_TRAINED: dict[tuple, list[ReferenceClassifier]] = {}
_KEPT = 4


def trained_references(dataset: Dataset, classes: int, device: str = "cpu", config: ReferenceConfig | None = None,
                       seed: int = 0) -> list[ReferenceClassifier]:
    """The ``config.count`` references trained on ``dataset`` from seeds ``seed, seed + 1, ...``
    (:func:`fmt_audit.verdict.evidence.reference.train_reference`). They depend on the images, labels and recipe only, not on
    the audited model, so the last few sets are kept and handed out again for the same images (the same
    networks a fresh training gives: training is deterministic on CPU for a seed)."""
    config = config or ReferenceConfig()
    digest = hashlib.sha256()
    for part in (dataset.x, dataset.y):
        if part is not None:
            digest.update(f"{part.shape}{part.dtype}".encode())
            digest.update(np.ascontiguousarray(part).tobytes())
    key = (digest.hexdigest(), classes, device, config, seed)
    if key not in _TRAINED:
        references = [train_reference(dataset, classes, device, config, seed + i) for i in range(config.count)]
        if len(_TRAINED) >= _KEPT:
            del _TRAINED[next(iter(_TRAINED))]
        _TRAINED[key] = references
    return _TRAINED[key]


def transfer_to_references(ladder: UniversalLadder, dataset: Dataset, classes: int, device: str = "cpu",
                           config: ReferenceConfig | None = None, seed: int = 0, batch: int = 512) -> TransferResult:
    """The ``config.count`` references of ``dataset`` (the ladder's images, float NCHW in [0, 1] with labels;
    :func:`trained_references`) and, per reference, each class's held-out success and median margin with the
    ladder's last perturbations and with none."""
    x = torch.from_numpy(np.ascontiguousarray(dataset.x, dtype=np.float32)).to(device)
    delta = torch.from_numpy(ladder.perturbations).to(device)
    figures: list[list[list[float]]] = [[], [], [], []]    # success, baseline, margin, margin baseline
    for reference in trained_references(dataset, classes, device, config, seed):
        moved, moved_margin = held_out_effect(reference, x, ladder.held, delta, batch)
        before, before_margin = held_out_effect(reference, x, ladder.held, torch.zeros_like(delta), batch)
        for rows, values in zip(figures, (moved, before, moved_margin, before_margin)):
            rows.append([round(float(v), 6) for v in values])
    return TransferResult(ladder, *figures)


def transfer_test(model: onnx.ModelProto, image: ImageInput, preprocessing: Preprocessing, dataset: Dataset,
                  device: str = "auto", config: UniversalConfig | None = None,
                  references: ReferenceConfig | None = None, bridge: TorchBridge | None = None,
                  progress: Callable[[float, float], None] | None = None,
                  margin: MarginConfig | None = None) -> tuple[TransferResult, list[str]]:
    """The universal ladder of an ONNX classifier on labelled ``dataset`` images (:func:`universal_test`,
    same arguments), then its transfer to reference networks trained on the same images, and notes. With
    ``margin``, the maximum-margin test too (:func:`fmt_audit.verdict.margin.max_margins`, in ``margins``), on the
    same conversion of the model."""
    classifier, classes, notes = logit_classifier(model, image, preprocessing, device, bridge, "transfer test")
    shape = (image.channels, image.height, image.width)
    margins = None
    if margin is not None:
        log.info("maximum-margin test: %d classes x %d starts x %d steps", classes, margin.restarts, margin.steps)
        margins = [float(m) for m in max_margins(classifier, shape, classes, margin)]
    config = config or UniversalConfig()
    ladder = universal_ladder(classifier, dataset, classes, config, progress)
    references = references or ReferenceConfig()
    log.info("transfer test: %d reference networks, %d steps each", references.count, references.steps)
    found = transfer_to_references(ladder, dataset, classes, "cpu", references, config.seed, config.batch)
    return replace(found, margins=margins), notes
