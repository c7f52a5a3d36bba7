"""The repair's settings, validated once: the method, fine-tuning, unlearning, removal. No torch here: the CLI
and fleet manifests build these before anything heavy is imported."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fmt_audit.data import check_seed
from fmt_audit.errors import ConfigError

FLIPS = ("auto", "on", "off")


@dataclass(frozen=True)
class FineTuneConfig:
    """Training settings; the defaults are the published recipe."""

    epochs: int = 10
    lr: float = 0.01
    final_lr: float = 1e-4
    momentum: float = 0.9
    batch_size: int | None = None   # None: auto, see batch_for
    augment: bool = True
    flip: str = "auto"
    seed: int = 0
    # gradient-norm clipping: exported graphs usually have BatchNorm folded into the
    # Conv weights, and without the normalisation SGD at lr 0.01 can diverge in a few
    # steps (measured on the bundled samples: loss 0.14 -> 10.6 in one epoch)
    max_grad_norm: float | None = 5.0

    def __post_init__(self):
        if self.epochs < 0:
            raise ConfigError(f"--epochs must be 0 or more; got {self.epochs}")
        check_seed(self.seed)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number; got {self.lr}")
        if not (math.isfinite(self.final_lr) and 0 <= self.final_lr <= self.lr):
            raise ConfigError(f"the final learning rate must be in [0, lr={self.lr}]; got {self.final_lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1); got {self.momentum}")
        if self.batch_size is not None and self.batch_size < 2:
            raise ConfigError(f"--batch-size must be at least 2 (BatchNorm trains on batches); got {self.batch_size}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"the gradient-norm clip must be positive (or None); got {self.max_grad_norm}")
        if self.flip not in FLIPS:
            raise ConfigError(f"--flip must be one of {', '.join(FLIPS)}; got {self.flip!r}")

    def batch_for(self, images: int) -> int:
        """The batch size for ``images`` training images: ``batch_size`` when set, else
        ``min(256, max(16, images // 10))`` -- the published 256 where the data allows,
        and about ten steps per epoch (as 2,500 images at 256 give) on smaller sets."""
        if self.batch_size is not None:
            return self.batch_size
        return min(256, max(16, images // 10))

    def steps_per_epoch(self, images: int) -> int:
        """Optimizer steps per epoch over ``images`` (a last batch of one image is dropped)."""
        batch = self.batch_for(images)
        return max(1, images // batch + (images % batch > 1))

    def learning_rate(self, step: int, total: int) -> float:
        """Cosine from ``lr`` at step 0 to ``final_lr`` at the last step."""
        if total <= 1:
            return self.lr
        return self.final_lr + (self.lr - self.final_lr) * (1 + math.cos(math.pi * step / (total - 1))) / 2


@dataclass(frozen=True)
class AnpConfig:
    """Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021); the defaults are the reference code's
    (csdongxian/ANP_backdoor: optimize_mask_cifar.py, prune_neuron_cifar.py and the paper's threshold); in
    the comments, the reference's own option names."""

    eps: float = 0.4              # the adversary's neuron perturbation bound (--anp-eps)
    steps: int = 1                # the adversary's signed-gradient steps, each eps / steps (--anp-steps)
    tradeoff: float = 0.2         # weight of the clean loss against the perturbed one (--anp-alpha)
    lr: float = 0.2               # SGD on the masks, momentum 0.9 (--lr)
    iterations: int = 2000        # mask updates (--nb-iter)
    batch_size: int = 128         # images per update, drawn with replacement (--batch-size)
    threshold: float = 0.2        # neurons whose mask ends at or below this are pruned (--pruning-by threshold)

    def __post_init__(self):
        if not (math.isfinite(self.eps) and 0 <= self.eps <= 1):
            raise ConfigError(f"--anp-eps must be a number in [0, 1]; got {self.eps}")
        if not (isinstance(self.steps, (int, np.integer)) and self.steps >= 1):
            raise ConfigError(f"the ANP adversary's steps must be a whole number of at least 1; got {self.steps}")
        if not (math.isfinite(self.tradeoff) and 0 <= self.tradeoff <= 1):
            raise ConfigError(f"--anp-tradeoff must be a number in [0, 1]; got {self.tradeoff}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"the ANP mask learning rate must be a positive number; got {self.lr}")
        if not (isinstance(self.iterations, (int, np.integer)) and self.iterations >= 1):
            raise ConfigError(f"--anp-iterations must be a whole number of at least 1; got {self.iterations}")
        if not (isinstance(self.batch_size, (int, np.integer)) and self.batch_size >= 2):
            raise ConfigError(f"the ANP batch size must be at least 2 (BatchNorm runs in training mode); "
                              f"got {self.batch_size}")
        if not (math.isfinite(self.threshold) and 0 <= self.threshold < 1):
            raise ConfigError(f"--anp-threshold must be a number in [0, 1) (masks end in [0, 1]; 1 would prune "
                              f"every channel); got {self.threshold}")


@dataclass(frozen=True)
class IbauConfig:
    """i-BAU's settings (:mod:`fmt_audit.repair.ibau`), the reference code's defaults
    (YiZeng623/I-BAU ``defense.py``)."""

    rounds: int = 5                 # perturbation search + unlearning passes (--n_rounds)
    fixed_point_steps: int = 5      # fixed-point iterations of the implicit hypergradient (--K)
    lr: float = 0.001               # Adam on the weights (--lr)
    batch_size: int = 100           # (--batch_size)
    inner_step: float = 0.1         # the inner problem's gradient step (hg.GradientDescent(loss_inner, 0.1))
    perturbation_lr: float = 10.0   # SGD on the shared perturbation
    regularization: float = 0.001   # weight of ||delta||^2 in the perturbation's objective
    patched_share: float = 0.01     # images of a batch given the perturbation in the outer loss

    def __post_init__(self):
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise ConfigError(f"--ibau-rounds must be a whole number of at least 1; got {self.rounds}")
        if not (isinstance(self.fixed_point_steps, int) and self.fixed_point_steps >= 1):
            raise ConfigError(f"i-BAU's fixed-point steps must be at least 1; got {self.fixed_point_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--ibau-lr must be a positive number; got {self.lr}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"i-BAU's batch size must be at least 1; got {self.batch_size}")
        for name in ("inner_step", "perturbation_lr", "regularization"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"i-BAU's {name.replace('_', ' ')} must be a positive number; got {value}")
        if not 0 <= self.patched_share <= 1:
            raise ConfigError(f"i-BAU's patched share must be in [0, 1]; got {self.patched_share}")


@dataclass(frozen=True)
class RepairConfig:
    """Repair settings beyond the scan's (the scan's device, seed and preprocessing apply)."""

    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)
    allow_regrowth: bool = False
    holdout: float = 0.1
    tolerance: float = 1e-4        # ORT vs torch logits, relative to max(1, largest |logit|)
    # unlearning: fine-tune on feature-map perturbations too (FeatureMapPerturbation);
    # None: on, except under the scan preset "paper" (the published repair)
    unlearn: bool | None = None
    unlearn_eps: float | str = "auto"   # auto: the scan's gradient-mode eps, else calibrated here
    unlearn_steps: int = 5
    # half the unlearning copies stamped with the trace's reversed triggers (--selection trace, where it found any)
    unlearn_stamps: bool = True
    # the self-check also searches a small patch into the class the verdict named (fmt_audit.repair.patch_evidence)
    patch_check: bool = True
    method: str = "fmt"
    prune_drop: float = 0.05       # fp: the clean-accuracy drop at which pruning stops
    clp_u: float = 3.0             # clp: channels above mean + u * std of their layer's bounds are pruned
    anp: AnpConfig = field(default_factory=AnpConfig)   # anp: the mask search and the pruning threshold
    ibau: IbauConfig = field(default_factory=IbauConfig)   # ibau: rounds and the Adam learning rate

    def __post_init__(self):
        from fmt_audit.repair.methods.registry import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not 0 < self.prune_drop < 1:
            raise ConfigError(f"--prune-drop must be in (0, 1); got {self.prune_drop}")
        if not (np.isfinite(self.clp_u) and self.clp_u > 0):
            raise ConfigError(f"--clp-u must be a positive number; got {self.clp_u}")
        if self.unlearn_eps != "auto" and not (isinstance(self.unlearn_eps, (int, float))
                                               and 0 < self.unlearn_eps <= 1):
            raise ConfigError(f"--unlearn-eps must be 'auto' or in (0, 1]; got {self.unlearn_eps}")
        if self.unlearn_steps < 1:
            raise ConfigError(f"--unlearn-steps must be at least 1; got {self.unlearn_steps}")
        if not 0 <= self.holdout < 1:
            raise ConfigError(f"--holdout must be in [0, 1); got {self.holdout}")
        if not self.tolerance > 0:
            raise ConfigError(f"the verification tolerance must be positive; got {self.tolerance}")


def repair_config(seed: int = 0, method: str = "fmt", epochs: int = 10, lr: float = 0.01,
                  batch_size: int | None = None, augment: bool = True, flip: str = "auto",
                  allow_regrowth: bool = False, unlearn: bool | None = None, unlearn_eps: float | str = "auto",
                  holdout: float = 0.1, prune_drop: float = 0.05, clp_u: float = 3.0, anp_eps: float = 0.4,
                  anp_tradeoff: float = 0.2, anp_iterations: int = 2000, anp_threshold: float = 0.2,
                  ibau_rounds: int = 5, ibau_lr: float = 0.001, unlearn_stamps: bool = True,
                  patch_check: bool = True) -> RepairConfig:
    """A :class:`RepairConfig` from the flat options of ``fmt-audit repair`` (and of a fleet manifest's
    models): the fine-tuning settings among them, the learning rate decaying to min(1e-4, ``lr``)."""
    return RepairConfig(FineTuneConfig(epochs=epochs, lr=lr, final_lr=min(1e-4, lr), batch_size=batch_size,
                                       augment=augment, flip=flip, seed=seed),
                        allow_regrowth=allow_regrowth, holdout=holdout, unlearn=unlearn, unlearn_eps=unlearn_eps,
                        unlearn_stamps=unlearn_stamps, patch_check=patch_check, method=method,
                        prune_drop=prune_drop, clp_u=clp_u,
                        anp=AnpConfig(eps=anp_eps, tradeoff=anp_tradeoff, iterations=anp_iterations,
                                      threshold=anp_threshold),
                        ibau=IbauConfig(rounds=ibau_rounds, lr=ibau_lr))


