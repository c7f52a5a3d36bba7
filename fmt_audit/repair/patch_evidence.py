"""After the repair: does a small opaque patch, at the trigger's place, still lead the images into the class the
verdict named?

The verdict that checks a repair (:mod:`fmt_audit.repair.selfcheck`) can pass a repair that failed: on CIFAR-10
plain CNNs whose BadNets trigger survived (71-73% ASR left) Neural Cleanse's search ended at masks no smaller
than the other classes' (docs/research/repair-self-check.md). Here the trigger's shape is fixed: an opaque
square of side :func:`patch_shape` (an eighth of the image's shorter side), its content optimised to send a few
images of other classes into a class, its success measured on the sample's other images.

Its place is fixed too. A patch free to sit anywhere finds natural adversarial patches: on a CIFAR-10 plain CNN
one sends 90% of the images into a class that is not the target, more than a half-removed trigger does. A
BadNets trigger works at its place. So the **anchor** is found on the model as given: the best place, on a grid
of half the patch's side (any square trigger of side ``size - stride + 1`` or less lies inside one of its
squares), of a patch into the named class. On the repaired model the patch into the named class and into each
other class (all of them up to :data:`REFERENCES`, a seeded sample above) is fitted at the anchor; the named
class **leads** where its success is above :data:`FLOOR`, above every other class's, and more than
:data:`MEDIAN_FACTOR` times their median. Where it leads, the pipeline's stronger try is the repair's recipe
again for :data:`TRY_EPOCHS` epochs with half of the copies stamped with that patch, true labels.

Cost: the anchor's grid search, ``COARSE_STEPS x positions + (STEPS - COARSE_STEPS) x KEEP`` forward and backward
passes of :data:`FIT_IMAGES` images, then ``STEPS`` of them per class at the anchor; on one contended CPU thread
about a minute per repaired CIFAR-10 plain CNN (docs/research/repair-self-check.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmt_audit.backends.torch.bridge import BridgedClassifier
from fmt_audit.backends.torch.logits import as_logits
from fmt_audit.data import Dataset

STEPS = 30              # Adam steps on each position's content (lr 0.1, on a sigmoid)
COARSE_STEPS = 5        # after these, only the KEEP positions of lowest loss go on
KEEP = 8
FIT_IMAGES = 16         # images of other classes the content is fitted on; the rest of the sample measures it
REFERENCES = 9          # other classes searched for comparison (all of them up to this many)
FLOOR = 0.10            # the named class's success must be above this ...
MEDIAN_FACTOR = 2.0     # ... above every other class's, and above this times their median
TRY_EPOCHS = 5          # the stronger try's epochs where the patch leads
CHUNK = 256             # images per forward pass


@dataclass(frozen=True, eq=False)     # it holds an array: compared by identity
class FoundPatch:
    """The best patch into one class: its success on held images of other classes, its place and content."""

    label: int
    success: float
    spot: tuple[int, int]           # (row, column) of its top-left pixel
    content: np.ndarray             # [channels, size, size] in [0, 1]

    def stamp(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask [1, H, W], pattern [C, H, W])`` for images of ``shape`` (C, H, W), as the unlearning's
        stamps are given (:class:`fmt_audit.repair.finetune.StampOrPerturbation`)."""
        channels, height, width = shape
        size, (row, column) = self.content.shape[-1], self.spot
        window = (slice(None), slice(row, row + size), slice(column, column + size))
        mask, pattern = torch.zeros((1, height, width)), torch.zeros((channels, height, width))
        mask[window] = 1
        pattern[window] = torch.from_numpy(self.content)
        return mask, pattern


def patch_shape(height: int, width: int) -> tuple[int, int]:
    """The patch's side (an eighth of the image's shorter side, rounded up) and the grid's stride (half of it)."""
    size = math.ceil(min(height, width) / 8)
    return size, max(1, size // 2)


def reference_classes(classes: int, target: int, seed: int, most: int = REFERENCES) -> list[int]:
    """The classes the named one is compared with: all the others, or a seeded sample of ``most`` of them."""
    others = [c for c in range(classes) if c != target]
    if len(others) <= most:
        return others
    return sorted(np.random.default_rng([seed, classes]).choice(others, most, replace=False).tolist())


def _with_patch(images: torch.Tensor, patch: torch.Tensor, spot: tuple[int, int]) -> torch.Tensor:
    size = patch.shape[-1]
    out = images.clone()
    out[:, :, spot[0]:spot[0] + size, spot[1]:spot[1] + size] = patch
    return out


def grid(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """The patch's places: every ``stride``-th row and column, and the last ones (the borders are covered)."""
    rows, columns = (sorted({*range(0, side - size + 1, stride), side - size}) for side in (height, width))
    return [(r, c) for r in rows for c in columns]


def best_patch(classifier: BridgedClassifier, x: torch.Tensor, fit: np.ndarray, held: np.ndarray, label: int,
               size: int, spots: list[tuple[int, int]], seed: int) -> FoundPatch:
    """The best of ``spots``' patches into ``label``: content fitted on ``x[fit]``, success on ``x[held]``.
    ``classifier`` frozen (:func:`fmt_audit.backends.torch.logits.freeze`), ``x`` on its device."""
    channels = x.shape[1]
    generator = torch.Generator().manual_seed(seed)
    content = torch.randn((len(spots), channels, size, size), generator=generator).to(x.device)
    content.requires_grad_(True)
    optimiser = torch.optim.Adam([content], lr=0.1)
    x_fit = x[torch.from_numpy(fit).to(x.device)]
    per_chunk = max(1, CHUNK // len(fit))
    for step in range(STEPS):
        optimiser.zero_grad()
        losses = []
        for start in range(0, len(spots), per_chunk):       # chunked: the gradient of the mean, summed
            part = range(start, min(start + per_chunk, len(spots)))
            patches = torch.sigmoid(content[start:part.stop])
            batch = torch.cat([_with_patch(x_fit, patches[i - start], spots[i]) for i in part])
            target = torch.full((len(batch),), label, device=x.device)
            loss = F.cross_entropy(as_logits(classifier(batch)), target, reduction="none")
            (loss.sum() / (len(spots) * len(fit))).backward()
            losses.append(loss.detach())
        optimiser.step()
        if step + 1 == COARSE_STEPS and len(spots) > KEEP:
            kept = torch.argsort(torch.cat(losses).view(len(spots), len(fit)).mean(1))[:KEEP].tolist()
            spots = [spots[i] for i in kept]
            content = content.detach()[kept].clone().requires_grad_(True)
            optimiser = torch.optim.Adam([content], lr=0.1)
    x_held = x[torch.from_numpy(held).to(x.device)]
    with torch.inference_mode():
        patches = torch.sigmoid(content)
        hits = []
        for i, spot in enumerate(spots):
            images = _with_patch(x_held, patches[i], spot)
            chosen = torch.cat([as_logits(classifier(images[s:s + CHUNK])).argmax(1)
                                for s in range(0, len(images), CHUNK)])
            hits.append(float((chosen == label).float().mean()))
    best = int(np.argmax(hits))
    return FoundPatch(label, hits[best], spots[best], patches[best].cpu().numpy())


def search(classifier: BridgedClassifier, sample: Dataset, label: int, seed: int,
           at: tuple[int, int] | None = None) -> FoundPatch:
    """:func:`best_patch` into ``label`` on ``sample`` at ``at`` (``None``: on the :func:`grid`): fitted on its
    first :data:`FIT_IMAGES` images of other classes, measured on the rest of them."""
    others = np.flatnonzero(sample.y != label)
    height, width = sample.x.shape[2:]
    size, stride = patch_shape(height, width)
    x = torch.from_numpy(np.ascontiguousarray(sample.x)).to(classifier.device)
    spots = grid(height, width, size, stride) if at is None else [at]
    return best_patch(classifier, x, others[:FIT_IMAGES], others[FIT_IMAGES:], label, size, spots, seed)


def stands_out(success: float, references: list[float]) -> bool:
    """Whether a class's patch success stands out from the other classes' (the rule in the module's doc)."""
    return bool(success > FLOOR and (not references or (success > max(references)
                                                          and success > MEDIAN_FACTOR * float(np.median(references)))))


@dataclass(frozen=True, eq=False)
class PatchEvidence:
    """The anchored patch on a repaired model: the named class's patch and the other classes' success at the
    anchor, the place of the named class's best patch on the model as given."""

    anchor: FoundPatch                # the named class's best patch on the model as given (its place: the anchor)
    target: FoundPatch                # ... fitted at the anchor on the repaired model
    references: dict[int, float]      # other class -> its patch's success at the anchor on the repaired model
    stride: int                       # the anchor search's grid (the patch's side is the content's)
    seconds: float

    @property
    def leads(self) -> bool:
        return stands_out(self.target.success, list(self.references.values()))

    def to_dict(self) -> dict:
        rest = list(self.references.values())
        return {"target": self.target.label, "success": round(self.target.success, 4),
                "spot": list(self.anchor.spot), "given_success": round(self.anchor.success, 4),
                "size": int(self.target.content.shape[-1]), "stride": self.stride,
                "references": {str(k): round(v, 4) for k, v in self.references.items()},
                "best_other": round(max(rest), 4) if rest else None,
                "median_other": round(float(np.median(rest)), 4) if rest else None,
                "leads": self.leads}     # its time goes to the report's timing (same inputs, same figures)


def measurable(sample: Dataset, target: int, classes: int, seed: int = 0) -> bool:
    """Whether ``sample`` holds enough images of other classes to fit a patch into ``target`` and each reference
    class (:data:`FIT_IMAGES`) and to measure it on as many again: with fewer, success moves in steps too coarse
    for the rule."""
    return all(int((sample.y != label).sum()) >= 2 * FIT_IMAGES
               for label in [target, *reference_classes(classes, target, seed)])


def patch_evidence(given: BridgedClassifier | None, repaired: BridgedClassifier, sample: Dataset, target: int,
                   classes: int, seed: int = 0, before: PatchEvidence | None = None) -> PatchEvidence:
    """Whether a patch at the anchor still leads ``sample``'s images into ``target`` on ``repaired`` (frozen; the
    anchor: the place of the best patch into ``target`` on ``given``), compared with the reference classes
    (:func:`reference_classes`) there. ``before``: the evidence on an earlier repaired model, whose anchor and
    reference classes' figures are kept (after the stronger try only the target is fitted again)."""
    started = time.perf_counter()
    anchor = before.anchor if before is not None else search(given, sample, target, seed)
    found = search(repaired, sample, target, seed, at=anchor.spot)
    references = before.references if before is not None else {
        label: search(repaired, sample, label, seed, at=anchor.spot).success
        for label in reference_classes(classes, target, seed)}
    return PatchEvidence(anchor, found, dict(references), patch_shape(*sample.x.shape[2:])[1],
                         time.perf_counter() - started)
