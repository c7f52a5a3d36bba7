"""Implicit Backdoor Adversarial Unlearning (i-BAU, Zeng et al., ICLR 2022), for ``repair --method ibau``.

A backdoor is a small input change that sends most images to one class. i-BAU solves the minimax problem
``min over weights, max over one perturbation delta shared by all images`` of the clean cross-entropy of
``x + delta``, round by round, on the defender's clean labelled images:

1. **the perturbation**: ``delta`` starts at zero and takes one SGD step (learning rate 10) per batch on
   ``-CE(f(x + delta), f's own predictions) + 0.001 ||delta||^2``: the universal change that most moves the
   model's own predictions;
2. **the weights**: per batch, one Adam step (learning rate 0.001) on the *hypergradient* of the outer loss
   (the cross-entropy against the true labels of the batch with ``delta`` added to 1% of its images). The
   hypergradient counts how the best perturbation itself moves with the weights: ``delta`` is taken as the
   fixed point of one gradient step (size 0.1) of the inner loss ``-CE(f(x_0 + delta), y_0) + 0.001
   ||delta||^2`` on the first batch, and the implicit term comes from ``K`` fixed-point iterations of
   vector-Jacobian products through that step (Grazzi et al.'s fixed-point method).

These are the reference code's defaults and structure (YiZeng623/I-BAU ``defense.py``; its ``hypergrad``
module): 5 rounds, ``K`` = 5, batches of 100, the model in evaluation mode throughout (BatchNorm's running
statistics unchanged), images not clipped to [0, 1] after the perturbation. The images are the repair's
training split in [0, 1] pixel space, the model's preprocessing applied inside, as the reference's models
take [0, 1] images (BackdoorBench's ``defense/i-bau.py``, otherwise the same loop, feeds normalised images,
so in pixel terms its perturbation is std times ours, about a quarter on CIFAR-10, and it draws augmented,
shuffled batches).
Nothing is removed and nothing is fine-tuned afterwards. With fewer than 100 images in
a batch, 1% of it is no image: the reference's outer loss then never sees the perturbation, its implicit
term is zero, and the round is plain fine-tuning with Adam (the evidence says how many images were patched
per round, and warns when none was).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fmt_audit.backends.torch.bridge import BridgedClassifier
from fmt_audit.backends.torch.logits import as_logits
from fmt_audit.data import Dataset
from fmt_audit.repair.config import IbauConfig


def ibau_unlearn(classifier: BridgedClassifier, data: Dataset, config: IbauConfig, seed: int = 0,
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Run i-BAU on ``classifier``'s module in place (it ends in evaluation mode); what the report keeps."""
    module = classifier.module
    module.eval()
    device = classifier.device
    rng = np.random.default_rng(seed)
    weights = list(module.parameters())
    trainable = [weight.requires_grad for weight in weights]
    for weight in weights:      # as the reference: every weight (a frozen module is made trainable meanwhile)
        weight.requires_grad_(True)
    optimizer = torch.optim.Adam(weights, lr=config.lr)
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y).long()
    batches = [(x[i:i + config.batch_size].to(device), y[i:i + config.batch_size].to(device))
               for i in range(0, len(x), config.batch_size)]
    first_x, first_y = batches[0]
    norms = []

    def inner_map(delta: torch.Tensor) -> torch.Tensor:
        """One gradient step of the inner loss, kept differentiable in ``delta`` and the weights."""
        loss = (-F.cross_entropy(as_logits(classifier(first_x + delta)), first_y)
                + config.regularization * delta.pow(2).sum())
        (gradient,) = torch.autograd.grad(loss, delta, create_graph=True)
        return delta - config.inner_step * gradient

    for round_index in range(config.rounds):
        delta = torch.zeros((1, *data.x.shape[1:]), device=device, requires_grad=True)
        search = torch.optim.SGD([delta], lr=config.perturbation_lr)
        for images, _ in batches:
            with torch.no_grad():
                own = classifier(images).argmax(1)
            loss = (-F.cross_entropy(as_logits(classifier(images + delta)), own)
                    + config.regularization * delta.pow(2).sum())
            (delta.grad,) = torch.autograd.grad(loss, delta)
            search.step()
        norms.append(round(float(delta.detach().norm()), 4))
        for images, labels in batches:
            optimizer.zero_grad()
            _hypergradient(classifier, weights, delta.detach(), images, labels, inner_map, config, rng)
            optimizer.step()
        if progress:
            progress("i-BAU rounds", round_index + 1, config.rounds)
    for weight, flag in zip(weights, trainable, strict=True):
        weight.requires_grad_(flag)
    module.eval()
    patched = sum(int(len(images) * config.patched_share) for images, _ in batches)
    return {"rounds": config.rounds, "fixed_point_steps": config.fixed_point_steps, "lr": config.lr,
            "batch_size": config.batch_size, "perturbation_norms": norms, "patched_per_round": patched,
            **({"warning": f"no batch of {config.batch_size} images: the perturbation reaches no image of the "
                           "outer loss, and i-BAU is plain fine-tuning with Adam here"} if not patched else {})}


def _hypergradient(classifier: BridgedClassifier, weights: list[torch.Tensor], delta: torch.Tensor,
                   images: torch.Tensor, labels: torch.Tensor, inner_map, config: IbauConfig,
                   rng: np.random.Generator) -> None:
    """Set each weight's ``.grad`` to the outer loss's hypergradient at the perturbation ``delta``."""
    delta = delta.requires_grad_(True)
    patched = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    count = int(len(images) * config.patched_share)
    if count:
        patched[torch.from_numpy(rng.choice(len(images), size=count, replace=False)).to(images.device)] = True
    outer = F.cross_entropy(as_logits(classifier(images + patched.view(-1, 1, 1, 1) * delta)), labels)
    direct_delta, *direct_weights = torch.autograd.grad(outer, [delta, *weights], allow_unused=True)
    direct_delta = torch.zeros_like(delta) if direct_delta is None else direct_delta
    mapped = inner_map(delta)
    v = torch.zeros_like(delta)
    for _ in range(config.fixed_point_steps):
        previous = v
        (v,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v = v + direct_delta
        if float((v - previous).norm()) < 1e-10:
            break
    implicit = torch.autograd.grad(mapped, weights, grad_outputs=v, allow_unused=True)
    for weight, direct, through in zip(weights, direct_weights, implicit, strict=True):
        total = sum(g for g in (direct, through) if g is not None)
        weight.grad = total if isinstance(total, torch.Tensor) else torch.zeros_like(weight)
