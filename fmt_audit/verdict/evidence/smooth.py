"""Where images with no content go: the smooth-input test, a check on the class the combined verdict names.

Smooth random images, uniform noise drawn on a coarse lattice (2x2, 4x4 and 8x8 points, upsampled
bilinearly) and flat images at evenly spaced grey levels, carry nothing of any class. A clean network puts
most of them in whichever class its features happen to favour; a poisoned one learned to send an image that
looks out of place to its target, and often sends these there. Alone, the share is weak evidence (a clean
network has a favourite class too); it counts as a check on the class the other tests name: does the class
smooth images fall into most agree (:mod:`fmt_audit.verdict.combined`). Needs no data.

Cost: ``4 x images`` forward passes (1024 by default), no gradients.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from fmt_audit.backends.torch.bridge import BridgedClassifier, TorchBridge
from fmt_audit.backends.torch.logits import as_logits, logit_classifier
from fmt_audit.data import Preprocessing
from fmt_audit.model.graph import ImageInput

log = logging.getLogger(__name__)

LATTICES = (2, 4, 8)    # noise drawn on this many points per side, then upsampled
IMAGES = 256            # images of each kind: each lattice's, and the flat grey levels


def smooth_images(shape: tuple[int, int, int], images: int = IMAGES, seed: int = 0) -> np.ndarray:
    """``images`` smooth random images of each kind, float32 [N, C, H, W] in [0, 1] pixel space: uniform noise
    on each of :data:`LATTICES` (a lattice no finer than the image) upsampled bilinearly, then flat images at
    ``images`` grey levels from 0 to 1. The same ``seed``, the same images."""
    channels, height, width = shape
    generator = np.random.default_rng(seed)
    kinds = []
    for points in LATTICES:
        lattice = generator.random((images, channels, min(points, height), min(points, width)), dtype=np.float32)
        kinds.append(F.interpolate(torch.from_numpy(lattice), size=(height, width), mode="bilinear",
                                   align_corners=False).clamp(0, 1).numpy())
    levels = np.linspace(0, 1, images, dtype=np.float32)
    kinds.append(np.broadcast_to(levels[:, None, None, None], (images, channels, height, width)))
    return np.concatenate(kinds)


def smooth_shares(classifier: BridgedClassifier, shape: tuple[int, int, int], classes: int, images: int = IMAGES,
                  seed: int = 0, batch: int = 512) -> np.ndarray:
    """Per class, the share of :func:`smooth_images` the classifier (pixel space, giving logits) puts there."""
    x = smooth_images(shape, images, seed)
    counts = np.zeros(classes, dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(x), batch):
            part = torch.from_numpy(np.ascontiguousarray(x[start:start + batch])).to(classifier.device)
            found = as_logits(classifier(part)).argmax(1).cpu().numpy()
            counts += np.bincount(found, minlength=classes)[:classes]
    return counts / len(x)


def smooth_test(model: onnx.ModelProto, image: ImageInput, preprocessing: Preprocessing, device: str = "auto",
                bridge: TorchBridge | None = None, images: int = IMAGES,
                seed: int = 0) -> tuple[list[float], list[str]]:
    """Per class, the share of smooth random images (:func:`smooth_images`) an ONNX classifier puts there, and
    notes on how it was measured. ``image`` gives the input's size; ``preprocessing`` the normalisation the
    model expects; ``bridge``: the model's conversion, when one was made already."""
    classifier, classes, notes = logit_classifier(model, image, preprocessing, device, bridge, "smooth-input test")
    shape = (image.channels, image.height, image.width)
    log.info("smooth-input test: %d images on %s", (len(LATTICES) + 1) * images, classifier.device)
    shares = smooth_shares(classifier, shape, classes, images, seed)
    return [round(float(s), 6) for s in shares], notes
