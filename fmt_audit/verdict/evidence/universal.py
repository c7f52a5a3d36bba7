"""How small a change, the same for every image, carries the defender's images into each class: the
universal-perturbation ladder, evidence of the ``combined`` verdict.

A backdoor is a universal shortcut: one pattern, the trigger, sends images of every class to the target.
Trigger reverse engineering (Neural Cleanse, Wang et al., S&P 2019) and universal adversarial perturbations
(Moosavi-Dezfooli et al., CVPR 2017) search for such a pattern. Here, for every class k at once, projected
gradient descent looks for one additive perturbation inside an L2 ball that moves the labelled images of the
other classes into k, on a ladder of growing budgets (the ball's radius is ``budget * sqrt(pixels)``: the
budget is the RMS pixel change in [0, 1] pixel space). Each rung starts from the last one's perturbations.
Success is measured on held-out images, so a perturbation fitted to its few images does not count.

The ladder stops at the first budget where some class takes at least ``level`` of the held-out images. What
the verdict reads there is the *lead* of that class over the next one, less what transfers to clean
reference networks (:mod:`fmt_audit.verdict.combined`).
A natural attractor class, easy to reach in a clean model, becomes reachable when the model is fragile at
that budget anyway, so other classes are close behind; a backdoor target is reachable while the others are not.

Cost: ``rungs reached x steps x classes x images`` forward and backward passes, batched, and after each
rung one forward pass of every held-out image per class (``classes x held-out images``).
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
from fmt_audit.backends.torch.logits import as_logits, freeze, logit_classifier, margins
from fmt_audit.data import Dataset, Preprocessing
from fmt_audit.errors import DataError
from fmt_audit.model.graph import ImageInput
from fmt_audit.verdict.config import UniversalConfig

log = logging.getLogger(__name__)

MIN_HELD_OUT = 8    # held-out images of other classes a class's success is measured on, at the least


@dataclass(frozen=True)
class UniversalLadder:
    """What the test measured: per rung climbed, its budget and every class's held-out success."""

    budgets: list[float]            # RMS pixel change of each rung climbed
    success: list[list[float]]      # [rung][class]: share of held-out images of other classes sent to the class
    images: int                     # images per class the perturbations were fitted on, at the least
    held_out: int                   # held-out images per class, at the least
    # the last rung's perturbations [class, C, H, W] (pixel space) and, per class, the indices of the
    # dataset's held-out images its success was measured on: what other networks are tested with
    perturbations: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32), repr=False, compare=False)
    held: list[np.ndarray] = field(default_factory=list, repr=False, compare=False)
    # the last rung: per class, the median margin of the class over the held-out images with its perturbation
    held_out_margin: list[float] = field(default_factory=list, compare=False)


def _picks(labels: np.ndarray, pool: np.ndarray, classes: int, count: int | None,
           generator: np.random.Generator) -> list[np.ndarray]:
    """Per class, up to ``count`` images of ``pool`` (indices) labelled otherwise, drawn with ``generator``."""
    out = []
    for k in range(classes):
        others = pool[labels[pool] != k]
        out.append(np.sort(generator.permutation(others)[:count]) if count is not None else others)
    return out


def fit_and_held_out(dataset: Dataset, classes: int, images: int, seed: int,
                     test: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per class, the indices of up to ``images`` images of other classes to fit a class's perturbation on,
    and of every other-class image held out to measure it: half of ``dataset``, drawn with ``seed``, for each.
    ``test`` names the caller in errors."""
    generator = np.random.default_rng(seed)
    order = generator.permutation(len(dataset))
    fit_pool, held_pool = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
    fit = _picks(dataset.y, fit_pool, classes, images, generator)
    held = _picks(dataset.y, held_pool, classes, None, generator)
    fewest, fitted = min(len(h) for h in held), min(len(f) for f in fit)
    if fewest < MIN_HELD_OUT or fitted == 0:
        raise DataError(f"the {test} needs, for every class, at least {MIN_HELD_OUT} held-out "
                        f"images of other classes and some to fit on; {len(dataset)} images "
                        f"({len(np.unique(dataset.y))} labels) leave {fewest} held out and {fitted} to fit: give more "
                        f"images (--verdict-samples, or a larger --data)")
    return fit, held


def universal_ladder(classifier: BridgedClassifier, dataset: Dataset, classes: int,
                     config: UniversalConfig | None = None,
                     progress: Callable[[float, float], None] | None = None) -> UniversalLadder:
    """Climb the budget ladder on ``dataset`` (float NCHW in [0, 1] with labels): half of the images,
    drawn with ``config.seed``, to fit the perturbations, the other half to measure them. ``progress(budget,
    best success)`` is called after each rung."""
    config = config or UniversalConfig()
    freeze(classifier)
    fit, held = fit_and_held_out(dataset, classes, config.images, config.seed, "universal-perturbation test")
    fewest, fitted = min(len(h) for h in held), min(len(f) for f in fit)
    device = classifier.device
    x = torch.from_numpy(np.ascontiguousarray(dataset.x, dtype=np.float32)).to(device)
    shape = tuple(x.shape[1:])
    radius_per_budget = float(np.prod(shape)) ** 0.5
    delta = torch.zeros((classes, *shape), device=device)
    per_call = max(1, config.batch // config.images)       # classes fitted together
    budgets, success, reached_margin = [], [], np.zeros(classes)
    for rung in range(config.rungs):
        budget = config.first * config.factor ** rung
        radius = budget * radius_per_budget
        for first in range(0, classes, per_call):
            chunk = list(range(first, min(classes, first + per_call)))
            delta[chunk] = _fit(classifier, x, [fit[k] for k in chunk], chunk, delta[chunk], radius, config.steps)
        reached, reached_margin = held_out_effect(classifier, x, held, delta, config.batch)
        budgets.append(round(budget, 6))
        success.append([round(float(s), 6) for s in reached])
        if progress:
            progress(budget, float(reached.max()))
        if reached.max() >= config.level:
            break
    return UniversalLadder(budgets, success, fitted, fewest, delta.cpu().numpy(), held,
                           [round(float(m), 6) for m in reached_margin])


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Each row's L2 norm (at least 1e-12), shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (t.dim() - 1))


def _project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    return delta * torch.clamp(radius / _norms(delta), max=1.0)


def _fit(classifier: BridgedClassifier, x: torch.Tensor, picks: list[np.ndarray], chunk: list[int],
         start: torch.Tensor, radius: float, steps: int) -> torch.Tensor:
    """Projected normalised-gradient descent on the cross-entropy towards each class of ``chunk``, one
    perturbation per class shared by its images, from ``start`` projected into the ball."""
    sizes = [len(p) for p in picks]
    images = torch.cat([x[torch.from_numpy(p).to(x.device)] for p in picks])
    owner = torch.repeat_interleave(torch.arange(len(chunk), device=x.device), torch.tensor(sizes, device=x.device))
    targets = torch.tensor(chunk, device=x.device)[owner]
    delta = _project(start.clone(), radius).requires_grad_(True)
    step = radius / 8
    equal = len(set(sizes)) == 1    # then broadcast: an indexed gather's backward is not deterministic on CUDA

    def perturbed() -> torch.Tensor:
        if equal:
            return (images.view(len(chunk), sizes[0], *images.shape[1:]) + delta[:, None]).flatten(0, 1)
        return images + delta[owner]
    for _ in range(steps):
        loss = F.cross_entropy(as_logits(classifier(perturbed().clamp(0, 1))), targets, reduction="sum")
        gradient, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta -= step * gradient / _norms(gradient)
            delta.copy_(_project(delta, radius))
    return delta.detach()


def held_out_effect(classifier: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, held: list[np.ndarray],
                    delta: torch.Tensor, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per class ``k``, what adding ``delta[k]`` (clipped to [0, 1]) does to the images ``x[held[k]]`` in
    ``classifier`` (the audited model or any network giving logits or probabilities), as
    :func:`held_out_change` measures it."""
    return held_out_change(classifier, x, held, lambda images, k: (images + delta[k]).clamp(0, 1), batch)


def held_out_change(classifier: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, held: list[np.ndarray],
                    change: Callable[[torch.Tensor, int], torch.Tensor],
                    batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per class ``k``, what ``change(images, k)`` does to the images ``x[held[k]]`` in ``classifier``: the
    share it puts in class ``k``, and the median margin of ``k`` over the other classes
    (:func:`fmt_audit.backends.torch.logits.margins`: positive where the image is in ``k``; the median, so a
    few saturated images do not decide it)."""
    share, median = np.zeros(len(held)), np.zeros(len(held))
    with torch.no_grad():
        for k, indices in enumerate(held):
            hits, found = 0, []
            for start in range(0, len(indices), batch):
                part = torch.from_numpy(indices[start:start + batch]).to(x.device)
                logits = as_logits(classifier(change(x[part], k)))
                hits += int((logits.argmax(1) == k).sum())
                found.append(margins(logits, torch.full((len(part),), k, device=x.device)).double().cpu().numpy())
            share[k] = hits / len(indices)
            median[k] = float(np.median(np.concatenate(found)))
    return share, median


def universal_test(model: onnx.ModelProto, image: ImageInput, preprocessing: Preprocessing, dataset: Dataset,
                   device: str = "auto", config: UniversalConfig | None = None, bridge: TorchBridge | None = None,
                   progress: Callable[[float, float], None] | None = None) -> tuple[UniversalLadder, list[str]]:
    """The universal-perturbation ladder of an ONNX classifier on labelled ``dataset`` images, and notes on
    how it was taken. ``image`` gives the input's size; ``preprocessing`` the normalisation the model expects;
    ``device`` is ``auto``, ``cpu`` or ``cuda``. ``bridge``: the model's conversion, when one was made already."""
    classifier, classes, notes = logit_classifier(model, image, preprocessing, device, bridge,
                                                  "universal-perturbation test")
    config = config or UniversalConfig()
    log.info("universal-perturbation test: %d classes, budgets from %g on %s", classes, config.first,
             classifier.device)
    return universal_ladder(classifier, dataset, classes, config, progress), notes
