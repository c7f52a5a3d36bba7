"""The verdict's settings, validated once: which method, on how many images, and each evidence search's own.

No torch here: the CLI and the scan build these before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmt_audit.data import check_seed
from fmt_audit.errors import ConfigError


def _at_least(owner: str, values: dict[str, int], least: int = 1) -> None:
    for name, value in values.items():
        if value < least:
            raise ConfigError(f"{owner}'s {name} must be at least {least}; got {value}")


def _positive(owner: str, values: dict[str, float]) -> None:
    for name, value in values.items():
        if not (np.isfinite(value) and value > 0):
            raise ConfigError(f"{owner}'s {name} must be positive; got {value}")


def _share(owner: str, name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ConfigError(f"{owner}'s {name} must be in (0, 1]; got {value}")


@dataclass(frozen=True)
class VerdictConfig:
    """Which verdict method runs (:data:`fmt_audit.verdict.METHODS`), on how many of the labelled images
    (drawn with ``seed`` from the whole data file, whatever the channel scan uses), and the margin search's
    effort (``margin`` only)."""

    method: str = "combined"
    samples: int = 256
    seed: int = 0
    margin_restarts: int = 16
    margin_steps: int = 200

    def __post_init__(self):
        from fmt_audit.verdict.registry import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"--verdict must be one of {', '.join([*METHODS, 'none'])}; got {self.method!r}")
        if self.samples < 1:
            raise ConfigError(f"--verdict-samples must be at least 1; got {self.samples}")
        check_seed(self.seed)
        self.margin()    # checks --margin-restarts and --margin-steps

    @classmethod
    def from_options(cls, verdict: str | None = None, verdict_samples: int | None = None, seed: int | None = None,
                     margin_restarts: int | None = None, margin_steps: int | None = None) -> VerdictConfig | None:
        """From the CLI's and the fleet manifest's option names (``None``: the default); ``verdict="none"``
        gives None, no verdict."""
        if verdict == "none":
            return None
        given = {"method": verdict, "samples": verdict_samples, "seed": seed, "margin_restarts": margin_restarts,
                 "margin_steps": margin_steps}
        return cls(**{key: value for key, value in given.items() if value is not None})

    def margin(self) -> MarginConfig:
        return MarginConfig(restarts=self.margin_restarts, steps=self.margin_steps, seed=self.seed)

    def universal(self) -> UniversalConfig:
        return UniversalConfig(seed=self.seed)

    def cleanse(self) -> CleanseConfig:
        return CleanseConfig(seed=self.seed)

    def warp(self) -> WarpConfig:
        return WarpConfig(seed=self.seed)


@dataclass(frozen=True)
class MarginConfig:
    """How :func:`fmt_audit.verdict.evidence.margins.max_margins` searches for each class's largest margin."""

    restarts: int = 16      # random starting images per class
    steps: int = 200        # Adam steps per start
    lr: float = 0.05        # Adam step size on the sigmoid's argument
    seed: int = 0
    batch: int = 256        # images optimised in one forward pass (each start is independent of the others)

    def __post_init__(self):
        if self.restarts < 1:
            raise ConfigError(f"--margin-restarts must be at least 1; got {self.restarts}")
        if self.steps < 1:
            raise ConfigError(f"--margin-steps must be at least 1; got {self.steps}")
        _positive("the margin search", {"learning rate": self.lr})
        _at_least("the margin search", {"batch": self.batch})


@dataclass(frozen=True)
class UniversalConfig:
    """How :func:`fmt_audit.verdict.evidence.universal.universal_ladder` climbs its budget ladder."""

    first: float = 0.01         # the first rung's budget: RMS pixel change in [0, 1] pixel space
    factor: float = 2 ** 0.5    # each rung's budget over the last one's
    rungs: int = 11             # at most; the default ladder ends at 0.32
    steps: int = 20             # projected gradient steps per rung
    images: int = 32            # images per class the perturbation is fitted on
    level: float = 0.9          # held-out success of the leading class that ends the ladder
    seed: int = 0
    batch: int = 512            # images in one forward pass

    def __post_init__(self):
        _positive("the universal ladder", {"first budget": self.first})
        if not (np.isfinite(self.factor) and self.factor > 1):
            raise ConfigError(f"the universal ladder's budget factor must be above 1; got {self.factor}")
        _at_least("the universal ladder", {"rungs": self.rungs, "steps": self.steps, "images": self.images,
                                           "batch": self.batch})
        _share("the universal ladder", "level", self.level)


@dataclass(frozen=True)
class CleanseConfig:
    """How :func:`fmt_audit.verdict.evidence.cleanse.reverse_triggers` searches each class's smallest
    mask-and-pattern trigger (Neural Cleanse's optimisation, its defaults where they carry over)."""

    steps: int = 300        # Adam steps; every class is optimised at once
    lr: float = 0.1         # Adam step size on the masks' and patterns' sigmoid arguments
    images: int = 32        # images of other classes each class's trigger is fitted on
    level: float = 0.99     # success on those images a mask must reach to count (Neural Cleanse's 99%)
    cost: float = 1e-3      # the L1 weight once a class first reaches the level, per pixel of the mask
    patience: int = 10      # steps between adjustments of the weight (x1.5 when at the level, / 1.5^1.5 when not)
    seed: int = 0
    batch: int = 512        # images in one forward pass

    def __post_init__(self):
        _at_least("the trigger search", {"steps": self.steps, "images": self.images, "patience": self.patience,
                                         "batch": self.batch})
        _positive("the trigger search", {"lr": self.lr, "cost": self.cost})
        _share("the trigger search", "level", self.level)


@dataclass(frozen=True)
class WarpConfig:
    """How :func:`fmt_audit.verdict.evidence.warp.warp_search` looks for each class's smooth warp trigger."""

    budgets: tuple[float, ...] = (0.5, 1.0)    # each search's largest displacement per component, in pixels
    grid: int = 4           # control points per side of the flow field (WaNet's k)
    steps: int = 100        # Adam steps per budget, for each chunk of classes fitted together
    lr: float = 0.1         # Adam step size on the displacements' tanh arguments
    images: int = 32        # images of other classes each class's field is fitted on
    seed: int = 0
    batch: int = 512        # images in one forward pass

    def __post_init__(self):
        if not self.budgets:
            raise ConfigError("the warp search needs at least one budget; got none")
        object.__setattr__(self, "budgets", tuple(self.budgets))    # a list would leave the config unhashable
        _positive("the warp search", {"lr": self.lr, **{f"budget {b!r}": b for b in self.budgets}})
        _at_least("the warp search", {"steps": self.steps, "images": self.images, "batch": self.batch})
        _at_least("the warp search", {"grid (points a side)": self.grid}, 2)


@dataclass(frozen=True)
class ReferenceConfig:
    """How :func:`fmt_audit.verdict.evidence.reference.train_reference` trains the reference networks."""

    count: int = 3          # references, trained from seeds seed, seed + 1, ...
    steps: int = 400        # optimiser steps each, whatever the number of images
    batch: int = 64
    lr: float = 3e-3
    crop: int = 2           # random-crop padding in pixels

    def __post_init__(self):
        _at_least("the reference networks", {"count": self.count, "steps": self.steps, "batch": self.batch})
        _positive("the reference networks", {"learning rate": self.lr})
        _at_least("the reference networks", {"crop padding": self.crop}, least=0)
