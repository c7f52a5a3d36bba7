"""Fine-tuning a bridged model on the defender's clean data, removed channels held at zero.

The recipe is the published one: SGD with momentum, a per-step cosine schedule
from ``lr`` down to ``final_lr``, cross-entropy, light augmentation (random
crop with zero padding, and a horizontal flip only where the task allows it),
BatchNorm layers in training mode.

Removed channels stay removed: a forward hook multiplies each removed channel's
output by 0 — at the BatchNormalization that follows the Conv when there is one,
else at the Conv — so no gradient reaches the channel's filter, bias or BN
parameters and their zeroed values do not move. The reference implementation
lets them regrow; training outside :func:`fmt_audit.backends.torch.bridge.channels_held_at_zero` reproduces that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fmt_audit.backends.torch.bridge import BridgedClassifier
from fmt_audit.backends.torch.logits import as_logits
from fmt_audit.data import Dataset
from fmt_audit.repair.config import FineTuneConfig
from fmt_audit.verdict.evidence.cleanse import stamped

# the share of the unlearning copies that carry one of the trace's reversed triggers (fixed before the first row
# of docs/research/repair-stamp-unlearning.md and never changed)
STAMP_SHARE = 0.5

# flip augmentation is used in ``auto`` when the model's accuracy on mirrored images
# stays within this many points of its accuracy on the originals (see flip_decision)
FLIP_TOLERANCE = 0.05


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    loss: float                  # mean training loss over the epoch's batches
    accuracy: float              # training accuracy on the (augmented) batches
    holdout_accuracy: float | None
    lr: float                    # learning rate of the epoch's last step

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "loss": round(self.loss, 6), "accuracy": round(self.accuracy, 6),
                "holdout_accuracy": None if self.holdout_accuracy is None else round(self.holdout_accuracy, 6),
                "lr": round(self.lr, 8)}


def augment_batch(x: np.ndarray, rng: np.random.Generator, pad: int, flip: bool) -> np.ndarray:
    """Random crop of each image from its zero-padded copy, and a random horizontal flip if ``flip``."""
    n, _, h, w = x.shape
    out = x.copy()
    if pad > 0:
        padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        dy = rng.integers(0, 2 * pad + 1, size=n)
        dx = rng.integers(0, 2 * pad + 1, size=n)
        for i in range(n):
            out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    if flip:
        mirrored = rng.random(n) < 0.5
        out[mirrored] = out[mirrored, :, :, ::-1]
    return out


def crop_padding(height: int, width: int) -> int:
    """Zero padding for random crops: an eighth of the smaller side (4 px at 32x32, 2 at 16x16)."""
    return max(1, min(height, width) // 8)


def flip_decision(classifier: BridgedClassifier, data: Dataset, setting: str) -> tuple[bool, dict]:
    """Whether to flip horizontally, and why.

    ``auto`` asks the model: a task where mirroring changes the label (digits,
    text, traffic signs) leaves a model trained on it unable to read mirrored
    images, while a model trained with flips (natural images) reads them as well
    as the originals. Flip when the mirrored accuracy is within
    :data:`FLIP_TOLERANCE` of the original accuracy.
    """
    if setting != "auto":
        return setting == "on", {"setting": setting, "flip": setting == "on"}
    original = classifier.accuracy(data)
    mirrored = classifier.accuracy(Dataset(np.ascontiguousarray(data.x[..., ::-1]), data.y))
    use = mirrored >= original - FLIP_TOLERANCE
    return use, {"setting": "auto", "accuracy": round(original, 6), "mirrored_accuracy": round(mirrored, 6),
                 "tolerance": FLIP_TOLERANCE, "flip": use}


class StampOrPerturbation:
    """Unlearning copies that also use what the trace found: for ``share`` of the images (a seeded coin per
    image) the clean image stamped with one of ``stamps`` (the trace's reversed triggers, ``(mask [1, H, W],
    pattern [C, H, W])``, one drawn per image), for the others ``perturbation``'s copy; both are trained with the
    true label. Neural Cleanse's mitigation inside the unlearning: where the backdoor is spread over more
    channels than the cut may take, training on images that carry its reversed trigger, labelled with their
    true classes, teaches the model to ignore the trigger (docs/research/repair-stamp-unlearning.md)."""

    def __init__(self, perturbation: Callable[[torch.Tensor], torch.Tensor],
                 stamps: Sequence[tuple[torch.Tensor, torch.Tensor]], share: float = STAMP_SHARE, seed: int = 0):
        if not stamps:
            raise ValueError("stamp unlearning needs at least one reversed trigger")
        if not 0 <= share <= 1:
            raise ValueError(f"the share of stamped copies must be in [0, 1]; got {share}")
        self.perturbation = perturbation
        self.masks = torch.stack([torch.as_tensor(mask, dtype=torch.float32) for mask, _ in stamps])
        self.patterns = torch.stack([torch.as_tensor(pattern, dtype=torch.float32) for _, pattern in stamps])
        self.share = share
        self.rng = np.random.default_rng([seed, len(stamps)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # every image's perturbed copy first, so that its random draws do not depend on the coins
        out = self.perturbation(x).clone()     # a perturbation may hand back its input: never stamp that
        rows = np.flatnonzero(self.rng.random(len(x)) < self.share)
        which = torch.from_numpy(self.rng.integers(0, len(self.masks), len(rows)))
        if len(rows):
            index = torch.from_numpy(rows).to(x.device)
            out[index] = stamped(x[index], self.masks[which].to(x.device), self.patterns[which].to(x.device))
        return out


def fine_tune(classifier: BridgedClassifier, train: Dataset, config: FineTuneConfig, flip: bool,
              holdout: Dataset | None = None,
              progress: Callable[[EpochRecord], None] | None = None,
              perturb: Callable[[torch.Tensor], torch.Tensor] | None = None,
              clean_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
              ) -> list[EpochRecord]:
    """Train ``classifier`` in place on ``train``; one record per epoch.

    ``perturb``: perturbed copies of each batch are trained on too, with their true labels (unlearning).
    ``clean_loss(images, labels, logits)``: the loss of each batch's clean images (augmented, in pixel space);
    ``None``: cross-entropy with their labels (research varies it: docs/research/repair-distillation.md).

    Channels to hold at zero are set up by the caller
    (:func:`fmt_audit.backends.torch.bridge.channels_held_at_zero`).
    A last batch of a single image is dropped (BatchNorm cannot train on it).
    """
    module = classifier.module
    parameters = list(module.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum)
    rng = np.random.default_rng(config.seed)
    pad = crop_padding(train.x.shape[2], train.x.shape[3]) if config.augment else 0
    flip = flip and config.augment
    batch_size = config.batch_for(len(train))
    total = config.steps_per_epoch(len(train)) * config.epochs
    step = 0
    records = []
    loss_fn = torch.nn.CrossEntropyLoss()
    labels = torch.from_numpy(train.y)
    with torch.random.fork_rng(devices=[]):  # dropout and the like, seeded without touching the caller's RNG
        torch.manual_seed(config.seed)
        for epoch in range(1, config.epochs + 1):
            order = rng.permutation(len(train))
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            batches = [b for b in batches if len(b) > 1]
            module.train()
            loss_sum, correct, seen = 0.0, 0, 0
            lr = config.lr
            for index in batches:
                lr = config.learning_rate(step, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = augment_batch(train.x[index], rng, pad, flip) if config.augment else train.x[index]
                x = torch.from_numpy(np.ascontiguousarray(x)).to(classifier.device)
                y = labels[index].to(classifier.device)
                n = len(y)
                if perturb is not None:  # the perturbed copies too, with their true labels
                    x = torch.cat([x, perturb(x)])
                    y = torch.cat([y, y])
                optimizer.zero_grad(set_to_none=True)
                # a graph that ends in Softmax gives probabilities: their logarithm is what cross-entropy takes
                logits = as_logits(classifier(x))
                # clean loss at full weight, plus the perturbed copies' loss (unlearning)
                loss = loss_fn(logits[:n], y[:n]) if clean_loss is None else clean_loss(x[:n], y[:n], logits[:n])
                if perturb is not None:
                    loss = loss + loss_fn(logits[n:], y[n:])
                loss.backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                step += 1
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(y)
            held = classifier.accuracy(holdout) if holdout is not None and len(holdout) else None
            record = EpochRecord(epoch, loss_sum / max(seen, 1), correct / max(seen, 1), held, lr)
            records.append(record)
            if progress:
                progress(record)
    module.eval()
    for parameter in parameters:
        parameter.requires_grad_(False)
    return records
