"""How small a smooth warp carries the defender's images into each class: the warp search, evidence of the
``combined`` verdict.

A warping backdoor (WaNet, Nguyen & Tran, ICLR 2021) moves pixels instead of painting them: the trigger is one
fixed, smooth flow field of a fraction of a pixel to a pixel or two, invisible and spread over the whole image.
Neither a mask-and-pattern trigger (:mod:`.cleanse`) nor a faint additive perturbation (:mod:`.universal`)
describes it. Here, for every class k, a flow field of the trigger's own family is optimised so that warping
the labelled images of the other classes sends them to k: a ``grid`` x ``grid`` lattice of displacements
(WaNet's k x k), upsampled bicubically to the image, each component at most ``budget`` pixels (a tanh bound
and a clamp), applied with bilinear sampling (edges repeated). Its success is measured on held-out images.

A clean network is hard to move with a sub-pixel warp: digits and objects stay what they are, and when a
larger warp starts to move them it moves them to several classes. A network that learned a warp trigger
sends nearly every warped image to its target, and to no other class. What the verdict reads is the lead of
the class the warp reaches most over the next one (:mod:`fmt_audit.verdict.combined`).

Cost: ``budgets x steps x classes x images`` forward and backward passes, batched, then one forward pass of
every held-out image per class and budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fmt_audit.backends.torch.bridge import BridgedClassifier
from fmt_audit.backends.torch.logits import as_logits, freeze
from fmt_audit.data import Dataset
from fmt_audit.verdict.config import WarpConfig
from fmt_audit.verdict.evidence.universal import fit_and_held_out, held_out_change

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarpSearch:
    """What the search found: per budget, every class's held-out success and its flow field."""

    budgets: list[float]            # the largest displacement allowed, in pixels, of each search
    success: list[list[float]]      # [budget][class]: share of held-out images of other classes warped there
    images: int                     # images per class the fields were fitted on, at the least
    held_out: int                   # held-out images per class, at the least
    # [budget, class, 2, H, W]: each field's displacement in pixels (x, then y)
    fields: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32), repr=False, compare=False)


class Warp:
    """Bounded smooth flow fields on images of one size: ``fields(arguments)`` gives the displacements in
    pixels of a ``[K, 2, grid, grid]`` tensor of unbounded arguments, ``apply(images, displacement)`` warps."""

    def __init__(self, height: int, width: int, budget: float, device: torch.device | str = "cpu", grid: int = 4):
        self.height, self.width, self.budget = height, width, budget
        # bicubic upsampling of the lattice as one fixed linear map, [grid * grid, H * W], applied by a matrix
        # product: differentiating F.interpolate's bicubic mode on CUDA is not deterministic (atomic adds)
        points = torch.eye(grid * grid).reshape(grid * grid, 1, grid, grid)
        self.upsample = F.interpolate(points, size=(height, width), mode="bicubic", align_corners=True).reshape(
            grid * grid, height * width).to(device)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, height, device=device),
                                    torch.linspace(-1, 1, width, device=device), indexing="ij")
        self.identity = torch.stack((cols, rows), -1)[None]                 # grid_sample's (x, y) order
        # pixels -> grid_sample's units (align_corners: -1 and 1 are the centres of the edge pixels)
        self.scale = torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], device=device)

    def fields(self, arguments: torch.Tensor) -> torch.Tensor:
        points = (self.budget * torch.tanh(arguments)).flatten(2)               # [K, 2, grid * grid]
        smooth = (points @ self.upsample).unflatten(2, (self.height, self.width))
        # between its points the bicubic curve overshoots them (by up to ~85% of the budget where neighbours
        # alternate): the clamp keeps every component inside the budget
        return smooth.clamp(-self.budget, self.budget)

    def apply(self, images: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
        """``images`` [N, C, H, W] warped by one displacement ``[2, H, W]`` (pixels)."""
        grid = self.identity + displacement.permute(1, 2, 0)[None] * self.scale
        # differentiated for the grid only (the images need no gradient): no atomic adds on CUDA
        return F.grid_sample(images, grid.expand(len(images), -1, -1, -1), mode="bilinear", padding_mode="border",
                             align_corners=True)


def warp_search(classifier: BridgedClassifier, dataset: Dataset, classes: int, config: WarpConfig | None = None,
                progress: Callable[[int, int], None] | None = None) -> WarpSearch:
    """Every class's best bounded flow field on ``dataset`` (float NCHW in [0, 1] with labels), at each of
    ``config.budgets``: half of the images, drawn with ``config.seed``, to fit the fields on, the other half to
    measure them. ``progress(done, total)`` is told of every optimisation step."""
    config = config or WarpConfig()
    freeze(classifier)
    fit, held = fit_and_held_out(dataset, classes, config.images, config.seed, "warp search")
    device = classifier.device
    x = torch.from_numpy(np.ascontiguousarray(dataset.x, dtype=np.float32)).to(device)
    height, width = x.shape[2:]
    generator = torch.Generator().manual_seed(config.seed)
    per_call = max(1, config.batch // config.images)       # classes fitted together
    chunks = range(0, classes, per_call)
    total = len(config.budgets) * len(chunks) * config.steps
    done = 0
    if progress:
        progress(0, total)
    success, fields = [], []
    for budget in config.budgets:
        warp = Warp(height, width, budget, device, config.grid)
        # a small random start: at zero every class's gradient starts from the same unwarped images
        arguments = 0.1 * torch.randn((classes, 2, config.grid, config.grid), generator=generator)
        kept = torch.zeros((classes, 2, height, width), device=device)
        for first in chunks:
            chunk = list(range(first, min(classes, first + per_call)))
            kept[chunk] = _fit(classifier, warp, x, [fit[k] for k in chunk], chunk, arguments[chunk].to(device),
                               config, lambda step, before=done: progress(before + step, total) if progress else None)
            done += config.steps
        moved, _ = held_out_change(classifier, x, held, lambda images, k, warp=warp, kept=kept:
                                   warp.apply(images, kept[k]), config.batch)
        success.append([round(float(v), 6) for v in moved])
        fields.append(kept.cpu().numpy())
        log.info("warp search at %.3g px: class %d takes %.0f%% of held-out images", budget,
                 int(np.argmax(moved)), 100 * float(np.max(moved)))
    return WarpSearch([float(b) for b in config.budgets], success, min(len(f) for f in fit),
                      min(len(h) for h in held), np.stack(fields))


def fit_field(classifier: BridgedClassifier, x: torch.Tensor, fit: np.ndarray, target: int, budget: float,
              config: WarpConfig, seed: int = 0) -> tuple[Warp, torch.Tensor]:
    """``target``'s best flow field of at most ``budget`` pixels a component (``[2, H, W]``, pixels) fitted on
    the images ``x[fit]`` (of other classes) from a small random start drawn with ``seed``, and the
    :class:`Warp` that applies it (``classifier`` frozen)."""
    warp = Warp(*x.shape[2:], budget, x.device, config.grid)
    start = 0.1 * torch.randn((1, 2, config.grid, config.grid), generator=torch.Generator().manual_seed(seed))
    fields = _fit(classifier, warp, x, [fit], [target], start.to(x.device), config, lambda step: None)
    return warp, fields[0]


def _fit(classifier: BridgedClassifier, warp: Warp, x: torch.Tensor, picks: list[np.ndarray], chunk: list[int],
         start: torch.Tensor, config: WarpConfig, progress: Callable[[int], None]) -> torch.Tensor:
    """The displacement fields ``[len(chunk), 2, H, W]`` (pixels) of ``chunk``'s classes after ``config.steps``
    Adam steps on their images' mean cross-entropy towards the class."""
    groups = [x[torch.from_numpy(p).to(x.device)] for p in picks]
    sizes = [len(g) for g in groups]
    targets = torch.cat([torch.full((n,), k, device=x.device) for n, k in zip(sizes, chunk)])
    arguments = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([arguments], lr=config.lr)
    for step in range(config.steps):
        displacement = warp.fields(arguments)
        # class by class, then split: gathers and scatters would make the backward pass nondeterministic on CUDA
        logits = as_logits(classifier(torch.cat([warp.apply(g, displacement[i]) for i, g in enumerate(groups)])))
        loss = torch.stack([part.mean() for part in
                            F.cross_entropy(logits, targets, reduction="none").split(sizes)]).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        progress(step + 1)
    with torch.no_grad():
        return warp.fields(arguments)
