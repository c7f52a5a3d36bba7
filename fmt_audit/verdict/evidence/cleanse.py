"""The smallest trigger that carries the defender's images into each class: Neural Cleanse's trigger reverse
engineering (Wang et al., IEEE S&P 2019), evidence of the ``combined`` verdict.

A patch backdoor is a shortcut through a few pixels: stamping them sends images of every class to the target.
For every class k, a mask ``m`` (one value in [0, 1] per pixel, shared by the channels) and a pattern ``p``
(pixel space) are optimised so that ``(1 - m) * x + m * p`` puts the labelled images of the other classes
into k, while an L1 weight on the mask shrinks it. The weight follows Neural Cleanse's schedule: none until
the class first reaches ``level`` of its images, then ``cost``, raised x1.5 while the level holds and lowered
by 1.5^1.5 when it does not. Each class's smallest mask that reached the level is kept; a class whose mask is
far smaller than the others' (the mask ratio of :mod:`fmt_audit.verdict.combined`) is a target.

Every class is optimised at once, in one batch of ``classes x images`` (chunked by ``batch``). The kept masks
are measured on held-out images, so a mask fitted to its few images is seen for what it does elsewhere.

Cost: ``steps x classes x images`` forward and backward passes, batched, then one forward pass of every
held-out image per class.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from fmt_audit.backends.torch.bridge import BridgedClassifier, TorchBridge
from fmt_audit.backends.torch.logits import as_logits, freeze, logit_classifier
from fmt_audit.data import Dataset, Preprocessing
from fmt_audit.model.graph import ImageInput
from fmt_audit.verdict.config import CleanseConfig
from fmt_audit.verdict.evidence.universal import fit_and_held_out, held_out_change

log = logging.getLogger(__name__)

RAISE, LOWER = 1.5, 1.5 ** 1.5      # Neural Cleanse's multipliers of the L1 weight


@dataclass(frozen=True)
class ReversedTriggers:
    """What the search found: per class, its smallest mask's L1 norm as a share of the image's pixels."""

    norms: list[float]          # [class]: mask L1 / pixels; 1.0 where the class never reached the level
    reached: list[bool]         # [class]: whether some mask reached the level on its fitted images
    success: list[float]        # [class]: share of held-out images of other classes the kept trigger sends there
    images: int                 # images per class the triggers were fitted on, at the least
    held_out: int               # held-out images per class, at the least
    masks: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32), repr=False, compare=False)
    patterns: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32), repr=False, compare=False)


def stamped(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Images with the trigger stamped in: ``(1 - mask) * x + mask * pattern``."""
    return (1 - mask) * x + mask * pattern


def reverse_triggers(classifier: BridgedClassifier, dataset: Dataset, classes: int,
                     config: CleanseConfig | None = None,
                     progress: Callable[[int, int], None] | None = None) -> ReversedTriggers:
    """Every class's smallest reversed trigger on ``dataset`` (float NCHW in [0, 1] with labels): half of the
    images, drawn with ``config.seed``, to fit the triggers on, the other half to measure them.
    ``progress(done, total)`` is told of every optimisation step (``total``: the steps of every chunk of
    classes fitted together: the search's cost grows with the number of classes)."""
    config = config or CleanseConfig()
    freeze(classifier)
    fit, held = fit_and_held_out(dataset, classes, config.images, config.seed, "trigger search")
    device = classifier.device
    x = torch.from_numpy(np.ascontiguousarray(dataset.x, dtype=np.float32)).to(device)
    channels, height, width = x.shape[1:]
    generator = torch.Generator().manual_seed(config.seed)
    # random starts, as Neural Cleanse's: the sigmoid's arguments of uniform masks and patterns
    mask_start = torch.logit(torch.rand((classes, 1, height, width), generator=generator), eps=1e-3)
    pattern_start = torch.logit(torch.rand((classes, channels, height, width), generator=generator), eps=1e-3)
    masks = torch.ones((classes, 1, height, width))
    patterns = torch.zeros((classes, channels, height, width))
    norms, reached = np.ones(classes), np.zeros(classes, bool)
    per_call = max(1, config.batch // config.images)       # classes fitted together
    chunks = range(0, classes, per_call)
    steps = len(chunks) * config.steps      # every chunk runs the whole search
    if progress:
        progress(0, steps)
    for number, first in enumerate(chunks):
        chunk = list(range(first, min(classes, first + per_call)))
        told = (lambda step, before=number * config.steps: progress(before + step, steps)) if progress else None
        kept_masks, kept_patterns = _search(classifier, x, [fit[k] for k in chunk], chunk,
                                            mask_start[chunk].to(device), pattern_start[chunk].to(device), config,
                                            told)
        for k, mask, pattern in zip(chunk, kept_masks, kept_patterns):
            if mask is not None:
                masks[k], patterns[k] = mask.cpu(), pattern.cpu()
                norms[k], reached[k] = float(masks[k].mean()), True
    masks_on, patterns_on = masks.to(device), patterns.to(device)
    success, _ = held_out_change(classifier, x, held, lambda images, k: stamped(images, masks_on[k], patterns_on[k]),
                                 config.batch)
    return ReversedTriggers([round(float(v), 6) for v in norms], reached.tolist(),
                            [round(float(v), 6) for v in success], min(len(f) for f in fit),
                            min(len(h) for h in held), masks.numpy(), patterns.numpy())


def search_class(classifier: BridgedClassifier, x: torch.Tensor, fit: np.ndarray, target: int,
                 config: CleanseConfig, seed: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``target``'s smallest reversed trigger (mask ``[1, H, W]``, pattern ``[C, H, W]``) fitted on the images
    ``x[fit]`` (of other classes), from a random start drawn with ``seed``; ``(None, None)`` when no mask reached
    ``config.level`` of them."""
    channels, height, width = x.shape[1:]
    generator = torch.Generator().manual_seed(seed)
    mask_start = torch.logit(torch.rand((1, 1, height, width), generator=generator), eps=1e-3)
    pattern_start = torch.logit(torch.rand((1, channels, height, width), generator=generator), eps=1e-3)
    masks, patterns = _search(classifier, x, [fit], [target], mask_start.to(x.device), pattern_start.to(x.device),
                              config)
    return masks[0], patterns[0]


def _search(classifier: BridgedClassifier, x: torch.Tensor, picks: list[np.ndarray], chunk: list[int],
            mask_start: torch.Tensor, pattern_start: torch.Tensor, config: CleanseConfig,
            progress: Callable[[int], None] | None = None,
            ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Per class of ``chunk``, the smallest mask (and its pattern) that sent ``config.level`` of its images
    (``picks``) into the class during the search; None where none did."""
    groups = [x[torch.from_numpy(p).to(x.device)] for p in picks]
    sizes = [len(g) for g in groups]
    targets = torch.cat([torch.full((n,), k, device=x.device) for n, k in zip(sizes, chunk)])
    mask_arg = mask_start.clone().requires_grad_(True)
    pattern_arg = pattern_start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([mask_arg, pattern_arg], lr=config.lr, betas=(0.5, 0.9))   # Neural Cleanse's
    weight = torch.zeros(len(chunk), device=x.device)       # the L1 weight: none until the level is first reached
    best = torch.full((len(chunk),), float("inf"), device=x.device)
    kept_mask: list[torch.Tensor | None] = [None] * len(chunk)
    kept_pattern: list[torch.Tensor | None] = [None] * len(chunk)
    for step in range(config.steps):
        mask, pattern = torch.sigmoid(mask_arg), torch.sigmoid(pattern_arg)
        # class by class, then split: gathers and scatters would make the backward pass nondeterministic on CUDA
        logits = as_logits(classifier(torch.cat([stamped(g, mask[i], pattern[i]) for i, g in enumerate(groups)])))
        l1 = mask.flatten(1).sum(1)
        with torch.no_grad():
            success = torch.stack([(part.argmax(1) == k).float().mean()
                                   for part, k in zip(logits.split(sizes), chunk)])
            smaller = (success >= config.level) & (l1 < best)
            for position in torch.nonzero(smaller).flatten().tolist():
                kept_mask[position], kept_pattern[position] = mask[position].clone(), pattern[position].clone()
            best = torch.where(smaller, l1, best)
            if (step + 1) % config.patience == 0:
                at_level = success >= config.level
                weight = torch.where(at_level, torch.where(weight == 0, torch.full_like(weight, config.cost),
                                                           weight * RAISE), weight / LOWER)
        # per class: its images' mean cross-entropy plus its own weight on its mask's L1 norm
        cross_entropy = torch.stack([part.mean() for part in
                                     F.cross_entropy(logits, targets, reduction="none").split(sizes)])
        loss = (cross_entropy + weight * l1).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if progress:
            progress(step + 1)
    return kept_mask, kept_pattern


def cleanse_test(model: onnx.ModelProto, image: ImageInput, preprocessing: Preprocessing, dataset: Dataset,
                 device: str = "auto", config: CleanseConfig | None = None,
                 bridge: TorchBridge | None = None) -> tuple[ReversedTriggers, list[str]]:
    """Every class's smallest reversed trigger for an ONNX classifier on labelled ``dataset`` images, and
    notes on how it was taken. ``image`` gives the input's size; ``preprocessing`` the normalisation the model
    expects; ``device`` is ``auto``, ``cpu`` or ``cuda``. ``bridge``: the model's conversion, when one was made
    already."""
    classifier, classes, notes = logit_classifier(model, image, preprocessing, device, bridge, "trigger search")
    config = config or CleanseConfig()
    log.info("trigger search: %d classes, %d steps on %s", classes, config.steps, classifier.device)
    return reverse_triggers(classifier, dataset, classes, config), notes
