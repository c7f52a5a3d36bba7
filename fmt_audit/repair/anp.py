"""Adversarial Neuron Pruning (ANP, Wu & Wang, NeurIPS 2021), for ``repair --method anp``.

Backdoor neurons are the ones an adversary can most easily turn into a shortcut to one class: perturbing
the network's neurons slightly makes a backdoored model misclassify clean images far more readily than a
clean model. ANP gives every neuron a mask ``m`` in [0, 1] and optimises the masks on clean labelled images
against such perturbations; the neurons whose masks end low are pruned, and nothing is fine-tuned.

As the reference code does (csdongxian/ANP_backdoor, ``optimize_mask_cifar.py`` and
``models/anp_batchnorm.py``), for each batch:

1. the adversary's perturbations start uniform in ``[-eps, eps]`` (one per neuron for its scale, ``d``, and
   one for its shift, ``e``) and take ``steps`` signed-gradient ascent steps of ``eps / steps`` on the
   cross-entropy (not projected back into ``[-eps, eps]`` afterwards: the reference does not);
2. the masks take one SGD step (momentum 0.9) on
   ``tradeoff * CE(clean pass) + (1 - tradeoff) * CE(perturbed pass)`` and are clipped to [0, 1].

The reference's neurons are its BatchNorm layers' channels, in training mode: the BN weight is multiplied
by ``m`` (clean pass) or ``m + d`` (perturbed pass), the BN bias by 1 or ``1 + e``, and the batch's own
statistics normalise. Here the neurons sit on
:attr:`~fmt_audit.backends.torch.bridge.TorchBridge.channel_modules`, the channels the repair removes:

* the BatchNormalization after a Conv where the graph keeps one: exactly the reference's neuron (a forward
  hook turns the BN output ``w * x_hat + b`` into ``(m + d) * w * x_hat + (1 + e) * b``, the module in
  training mode);
* else -- most exported graphs, whose BatchNorm is folded into the Conv -- the Conv's output channel, with
  the train-mode BatchNorm the reference would have there put back: the channel is normalised with the
  batch's statistics and given back its mean and standard deviation on the clean data as shift and weight
  (without that normalisation the adversary's scalings compound from layer to layer, and at the reference's
  eps the masks of a folded network collapse). At ``m = 1`` and no perturbation this is the Conv's output, up
  to the batch's statistics differing from the data's, as in the reference.

The model is in training mode during the search, as in the reference; images are drawn with replacement,
``batch_size`` a step, with the repair's augmentation (random crops, flips where the task allows them), as
the reference trains its masks on augmented CIFAR-10. The neurons whose mask ends at or below ``threshold``
are pruned (the paper's rule, 0.2); the repair then removes them (their whole output, where the reference
zeroes the BN weight and leaves the BN bias).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fmt_audit.backends.torch.bridge import BridgedClassifier
from fmt_audit.backends.torch.logits import as_logits
from fmt_audit.data import Dataset
from fmt_audit.errors import ConfigError
from fmt_audit.model.graph import ConvLayer
from fmt_audit.repair.config import AnpConfig
from fmt_audit.repair.finetune import augment_batch, crop_padding
from fmt_audit.repair.pruning import PruningChoice

MOMENTUM = 0.9          # the reference's mask optimiser: SGD, momentum 0.9, no weight decay
BN_EPS = 1e-5           # the normalisation put back on folded channels: torch's BatchNorm2d default
STATISTICS_IMAGES = 1024    # clean images that measure a folded channel's mean and standard deviation
TRACE_POINTS = 10       # loss and clean accuracy recorded over this many stretches of the search
LOWEST = 32             # the lowest masks listed in the evidence, network-wide


def anp_channels(classifier: BridgedClassifier, layers: Sequence[ConvLayer], data: Dataset,
                 config: AnpConfig | None = None, seed: int = 0, augment: bool = True, flip: bool = False,
                 progress: Callable[[str, int, int], None] | None = None) -> PruningChoice:
    """ANP on ``classifier``'s module: the channels whose optimised mask ends at or below ``config.threshold``,
    and the evidence (every mask, rounded to 4 places as the reference's ``mask_values.txt``; the settings;
    the pruning rule; the loss along the way).

    ``data``: clean labelled images (the repair's training split). Deterministic for a ``seed`` on one
    device. The module is left as it was found: hooks removed, training/eval mode, parameters,
    BatchNorm statistics and ``requires_grad`` flags restored. ``progress(stage, done, total)`` is called
    as iterations complete.
    """
    import torch

    config = config or AnpConfig()
    if len(data) == 0:
        raise ConfigError("ANP optimises its masks on clean labelled images; the training data is empty")
    bridge = classifier.bridge
    module = classifier.module
    modes = [(sub, sub.training) for sub in module.modules()]
    names = [layer.name for layer in layers]
    norms = {name for name in names
             if isinstance(bridge.channel_modules[name], torch.nn.modules.batchnorm._BatchNorm)}
    folded = [name for name in names if name not in norms]
    statistics = _channel_statistics(classifier, folded, data.take(STATISTICS_IMAGES, seed=seed)) if folded else {}
    for sub, training in modes:      # measuring put the module in eval mode
        sub.training = training
    masks = {name: torch.ones(_width(bridge, name), device=classifier.device, requires_grad=True) for name in names}
    noise = {name: torch.zeros_like(mask) for name, mask in masks.items()}
    noise_shift = {name: torch.zeros_like(mask) for name, mask in masks.items()}
    perturbed = [False]

    def hook_for(name: str):
        norm = bridge.channel_modules[name] if name in norms else None
        bias = None if norm is None or norm.bias is None else norm.bias.detach().clone()

        def hook(_module, _inputs, output):
            view = (1, -1, *([1] * (output.dim() - 2)))
            weight = (masks[name] + noise[name] if perturbed[0] else masks[name]).to(output.dtype).view(view)
            if norm is not None:            # the reference's NoisyBatchNorm2d: w * x_hat + b, w and b scaled
                if bias is None:
                    return weight * output
                shift = bias.to(output.dtype).view(view)
                return weight * (output - shift) + (shift * (1 + noise_shift[name].to(output.dtype).view(view))
                                                    if perturbed[0] else shift)
            mean, std = (value.to(output.dtype).view(view) for value in statistics[name])
            dims = [d for d in range(output.dim()) if d != 1]
            normal = (output - output.mean(dims, keepdim=True)) / torch.sqrt(
                output.var(dims, unbiased=False, keepdim=True) + BN_EPS)
            shift = mean * (1 + noise_shift[name].to(output.dtype).view(view)) if perturbed[0] else mean
            return weight * std * normal + shift
        return hook

    state = {key: value.detach().clone() for key, value in module.state_dict().items()}
    grads = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    handles = []
    try:
        for parameter, _ in grads:
            parameter.requires_grad_(False)
        handles = [bridge.channel_modules[name].register_forward_hook(hook_for(name)) for name in names]
        with torch.random.fork_rng(devices=[]):     # dropout and the like, seeded without touching the caller's RNG
            torch.manual_seed(seed)
            trace = _optimise(classifier, data, config, seed, augment, flip, masks, noise, noise_shift, perturbed,
                              progress)
    finally:
        for handle in handles:
            handle.remove()
        module.load_state_dict(state)
        for sub, training in modes:
            sub.training = training
        for parameter, required in grads:
            parameter.requires_grad_(required)
    values = {name: mask.detach().cpu().double().numpy() for name, mask in masks.items()}
    carriers = {name: "batchnorm" if name in norms else "conv, batch-normalised" for name in names}
    return PruningChoice(*_choice(values, config, len(data), augment, flip, trace, carriers))


def _width(bridge, name: str) -> int:
    carrier = bridge.channel_modules[name]
    return int(carrier.num_features if hasattr(carrier, "num_features") else bridge.conv_weights(name).out_channels)


def _channel_statistics(classifier: BridgedClassifier, names: Sequence[str], data: Dataset,
                        batch_size: int = 256) -> dict:
    """Per layer, each output channel's mean and standard deviation over ``data``'s images and positions
    (the model in eval mode, as it is used)."""
    import torch

    sums: dict[str, list] = {name: [0.0, 0.0, 0] for name in names}

    def hook_for(name: str):
        def record(_module, _inputs, output):
            values = output.detach().double().transpose(0, 1).reshape(output.shape[1], -1)
            sums[name][0] = sums[name][0] + values.sum(1)
            sums[name][1] = sums[name][1] + (values * values).sum(1)
            sums[name][2] += values.shape[1]
        return record

    handles = [classifier.bridge.channel_modules[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        classifier.logits(data.x, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, (total, squares, count) in sums.items():
        mean = total / count
        std = torch.sqrt((squares / count - mean * mean).clamp(min=0))
        out[name] = (mean.float().to(classifier.device), std.float().to(classifier.device))
    return out


def _optimise(classifier: BridgedClassifier, data: Dataset, config: AnpConfig, seed: int, augment: bool,
              flip: bool, masks: dict, noise: dict, noise_shift: dict, perturbed: list,
              progress: Callable[[str, int, int], None] | None) -> list[dict]:
    """The reference's ``mask_train`` loop, ``config.iterations`` batches; the loss trace."""
    import torch

    module = classifier.module
    mask_list = list(masks.values())
    adversary = [*noise.values(), *noise_shift.values()]
    optimizer = torch.optim.SGD(mask_list, lr=config.lr, momentum=MOMENTUM)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    pad = crop_padding(data.x.shape[2], data.x.shape[3]) if augment else 0
    labels = torch.from_numpy(data.y.astype(np.int64))
    every = max(1, config.iterations // TRACE_POINTS)
    trace, loss_sum, correct, seen = [], 0.0, 0, 0
    module.train()
    for iteration in range(1, config.iterations + 1):
        index = rng.integers(0, len(data), size=config.batch_size)     # with replacement, as RandomSampler
        x = augment_batch(data.x[index], rng, pad, flip) if augment else data.x[index]
        x = torch.from_numpy(np.ascontiguousarray(x)).to(classifier.device)
        y = labels[index].to(classifier.device)
        if config.eps > 0:
            # the adversary: a random start in [-eps, eps], then signed ascent steps on the loss
            with torch.no_grad():
                for tensor in adversary:
                    start = (torch.rand(tensor.shape, generator=generator) * 2 - 1) * config.eps
                    tensor.copy_(start.to(tensor.device))
            perturbed[0] = True
            for _ in range(config.steps):
                for tensor in adversary:
                    tensor.requires_grad_(True)
                gradients = torch.autograd.grad(loss_fn(as_logits(classifier(x)), y), adversary)
                with torch.no_grad():
                    for tensor, gradient in zip(adversary, gradients):
                        tensor.requires_grad_(False)
                        tensor.add_(torch.sign(gradient), alpha=config.eps / config.steps)
            robust = loss_fn(as_logits(classifier(x)), y)
        else:
            robust = 0.0
        perturbed[0] = False
        logits = as_logits(classifier(x))
        natural = loss_fn(logits, y)
        loss = config.tradeoff * natural + (1 - config.tradeoff) * robust
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for mask in mask_list:
                mask.clamp_(0.0, 1.0)
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
        if iteration % every == 0 or iteration == config.iterations:
            trace.append({"iteration": iteration, "loss": round(loss_sum / seen, 6),
                          "clean_accuracy": round(correct / seen, 6)})
            loss_sum, correct, seen = 0.0, 0, 0
        if progress:
            progress("anp masks", iteration, config.iterations)
    return trace


def _choice(values: dict[str, np.ndarray], config: AnpConfig, images: int, augment: bool, flip: bool,
            trace: list[dict], carriers: dict[str, str]) -> tuple[dict[str, list[int]], dict]:
    """The channels at or below the threshold, and the evidence."""
    channels = {name: np.flatnonzero(mask <= config.threshold).tolist() for name, mask in values.items()}
    channels = {name: pruned for name, pruned in channels.items() if pruned}
    every = np.concatenate(list(values.values())) if values else np.zeros(0)
    ranked = sorted(((float(mask[c]), name, int(c)) for name, mask in values.items() for c in range(len(mask))))
    whole = [name for name, mask in values.items() if len(mask) and bool(np.all(mask <= config.threshold))]
    evidence = {
        "neuron": "each Conv layer's output channel where it reaches the network: its BatchNormalization's "
                  "channel if one follows (the reference's neuron), else the Conv's output normalised with batch "
                  "statistics and given its clean mean and std (the folded BatchNorm put back, train mode)",
        "carriers": carriers,
        "settings": {"eps": config.eps, "steps": config.steps, "tradeoff": config.tradeoff, "lr": config.lr,
                     "momentum": MOMENTUM, "iterations": config.iterations, "batch_size": config.batch_size,
                     "mode": "train", "augment": augment, "flip": flip},
        "iterations_run": config.iterations, "images": images,
        "rule": f"prune where mask <= {config.threshold}", "threshold": config.threshold,
        "summary": {"neurons": int(every.size), "pruned": int(sum(len(c) for c in channels.values())),
                    "min": _round(every.min()), "median": _round(np.median(every)), "mean": _round(every.mean()),
                    "max": _round(every.max()), "at_zero": int((every == 0).sum()), "at_one": int((every == 1).sum())}
        if every.size else {"neurons": 0, "pruned": 0},
        "whole_layers_pruned": whole,
        "lowest": [{"layer": name, "channel": c, "mask": _round(value)} for value, name, c in ranked[:LOWEST]],
        "masks": {name: [_round(v) for v in mask] for name, mask in values.items()},
        "trace": trace,
    }
    return channels, evidence


def _round(value) -> float:
    return round(float(value), 4)
