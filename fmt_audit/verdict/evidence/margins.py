"""The largest margin each class can reach (MM-BD), the evidence of the ``margin`` verdict.

MM-BD (Wang, Xiang, Miller, Kesidis, "MM-BD: Post-Training Detection of Backdoor
Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic",
IEEE S&P 2024): a backdoor gives its target class a shortcut that no ordinary
class has, so the largest margin ``logit_k - max_{j != k} logit_j`` that any image
reaches is abnormally large for the target, whatever the trigger looks like. Per
class, gradient ascent (Adam) on that margin from ``restarts`` random images,
kept in [0, 1] pixel space by a sigmoid; the largest margin over the starts and
steps. No data is needed. :func:`fmt_audit.verdict.margin.margin_verdict` turns the
per-class margins into a suspicion.

Cost: ``classes x restarts x steps`` forward and backward passes of single
images, batched; independent of the data and of the number of channels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
import torch

from fmt_audit.backends.torch.bridge import BridgedClassifier, TorchBridge
from fmt_audit.backends.torch.logits import (
    as_logits,
    freeze,
    logit_classifier,
    margins,
)
from fmt_audit.data import Preprocessing
from fmt_audit.model.graph import ImageInput
from fmt_audit.verdict.config import MarginConfig

log = logging.getLogger(__name__)


def max_margins(classifier: BridgedClassifier, shape: tuple[int, int, int], classes: int,
                config: MarginConfig | None = None,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The largest margin reached for each of ``classes`` classes, ``[classes]``.

    ``shape`` is the image's (channels, height, width); ``progress(k)`` is called as
    classes finish. Starting images are drawn class after class from one seeded
    generator, so the result does not depend on ``config.batch``.
    """
    config = config or MarginConfig()
    freeze(classifier)
    generator = torch.Generator().manual_seed(config.seed)
    per_call = max(1, config.batch // config.restarts)     # classes optimised together
    best = np.full(classes, -np.inf)
    for first in range(0, classes, per_call):
        chunk = list(range(first, min(classes, first + per_call)))
        start = torch.cat([torch.randn((config.restarts, *shape), generator=generator) for _ in chunk])
        z = start.to(classifier.device).requires_grad_(True)
        targets = torch.tensor(chunk, device=classifier.device).repeat_interleave(config.restarts)
        optimizer = torch.optim.Adam([z], lr=config.lr)
        reached = torch.full((len(z),), float("-inf"), device=classifier.device)
        for _ in range(config.steps):
            margin = margins(as_logits(classifier(torch.sigmoid(z))), targets)
            reached = torch.maximum(reached, margin.detach())
            optimizer.zero_grad(set_to_none=True)
            (-margin.sum()).backward()
            optimizer.step()
        with torch.no_grad():   # the last step's images too
            margin = margins(as_logits(classifier(torch.sigmoid(z))), targets)
            reached = torch.maximum(reached, margin).view(len(chunk), config.restarts).max(1).values
        best[chunk] = reached.double().cpu().numpy()
        if progress:
            progress(len(chunk))
    return best


def margin_test(model: onnx.ModelProto, image: ImageInput, preprocessing: Preprocessing, device: str = "auto",
                config: MarginConfig | None = None, bridge: TorchBridge | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """The per-class maximum margins of an ONNX classifier, and notes on how they were taken (a removed
    final Softmax). ``image`` gives the input's size; ``preprocessing`` the normalisation it expects;
    ``device`` is ``auto``, ``cpu`` or ``cuda``. ``bridge``: the model's conversion, when one was made
    already (used unless a final Softmax has to go)."""
    classifier, classes, notes = logit_classifier(model, image, preprocessing, device, bridge,
                                                  "maximum-margin test")
    config = config or MarginConfig()
    log.info("maximum-margin test: %d classes x %d starts x %d steps on %s", classes, config.restarts, config.steps,
             classifier.device)
    shape = (image.channels, image.height, image.width)
    return max_margins(classifier, shape, classes, config, progress), notes
