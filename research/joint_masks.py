"""Joint selection (research, lost: docs/research/set-selection.md): the channel *set* found by optimising every
Conv channel's mask at once.

The per-channel test disturbs one channel at a time, so it cannot see a backdoor spread over many channels
that stand in for each other: removing any one changes nothing, removing the set kills the trigger. Here
every Conv output channel ``c`` gets a mask ``m_c`` in [0, 1] (a forward hook on the module that carries
the channel to the rest of the network, the same place the scan's ``Mul`` masks sit), optimised jointly on
the clean labelled images in the manner of adversarial neuron perturbation (ANP, Wu & Wang, NeurIPS 2021):

    min_m  tradeoff * L(x, y; m)  +  (1 - tradeoff) * max_{|d| <= eps} L(x, y; m + d)

where ``d`` multiplies each channel's output like the mask does. Channels that carry a backdoor are the ones
an adversary can most cheaply turn into a shortcut to one class; the inner maximisation finds that shortcut
on clean images, and the outer minimisation closes it by lowering those channels' masks, while the clean
term keeps the masks of the channels the task needs near 1. The flagged set is the channels whose mask ends
below ``threshold``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fmt_audit.backends.torch.bridge import BridgedClassifier
from fmt_audit.data import Dataset
from fmt_audit.model.graph import ConvLayer


@dataclass(frozen=True)
class JointConfig:
    eps: float = 0.4            # how far the adversary may scale each channel (ANP's default)
    tradeoff: float = 0.2       # weight of the clean loss against the perturbed one (ANP's alpha)
    iterations: int = 300
    batch_size: int = 128
    lr: float = 0.2             # SGD on the masks, momentum 0.9
    threshold: float = 0.2      # a channel whose mask ends below this is flagged
    seed: int = 0


class ChannelMasks:
    """A mask and a perturbation per Conv output channel, applied by forward hooks while the block lasts."""

    def __init__(self, classifier: BridgedClassifier, layers: Sequence[ConvLayer]):
        device = classifier.device
        self.layers = list(layers)
        self.masks = {layer.name: torch.ones(layer.out_channels, device=device, requires_grad=True)
                      for layer in self.layers}
        self.noise = {layer.name: torch.zeros(layer.out_channels, device=device, requires_grad=True)
                      for layer in self.layers}
        self.perturbed = False
        self._modules = {layer.name: classifier.bridge.channel_modules.get(layer.name,
                                                                           classifier.bridge.conv_modules[layer.name])
                         for layer in self.layers}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        handles = [module.register_forward_hook(self._hook(name)) for name, module in self._modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str) -> Callable:
        def hook(_module, _inputs, output):
            scale = self.masks[name] + self.noise[name] if self.perturbed else self.masks[name]
            return output * scale.view(1, -1, *([1] * (output.dim() - 2)))
        return hook

    def randomize_noise(self, eps: float, generator: torch.Generator) -> None:
        with torch.no_grad():
            for noise in self.noise.values():
                noise.copy_((torch.rand(noise.shape, generator=generator) * 2 - 1).to(noise.device) * eps)

    def values(self) -> dict[str, np.ndarray]:
        return {name: mask.detach().cpu().numpy().copy() for name, mask in self.masks.items()}


def optimise_masks(classifier: BridgedClassifier, layers: Sequence[ConvLayer], data: Dataset,
                   config: JointConfig = JointConfig(),
                   progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Every channel's mask after the joint optimisation: ``{layer: [C]}`` in [0, 1]."""
    module = classifier.module
    module.eval()   # BatchNorm keeps its statistics: the masks are judged on the model as it is used
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    masks = ChannelMasks(classifier, layers)
    mask_opt = torch.optim.SGD(list(masks.masks.values()), lr=config.lr, momentum=0.9)
    noise_opt = torch.optim.SGD(list(masks.noise.values()), lr=config.eps)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    loss_fn = torch.nn.CrossEntropyLoss()
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.y.astype(np.int64))
    batch = min(config.batch_size, len(data))
    with masks.applied():
        for step in range(config.iterations):
            pick = torch.from_numpy(rng.choice(len(data), batch, replace=False))
            x, y = x_all[pick].to(classifier.device), y_all[pick].to(classifier.device)
            # the adversary: from a random start, one ascent step on the loss, kept inside [-eps, eps]
            masks.randomize_noise(config.eps, generator)
            masks.perturbed = True
            noise_opt.zero_grad()
            (-loss_fn(classifier(x), y)).backward()
            noise_opt.step()
            with torch.no_grad():
                for noise in masks.noise.values():
                    noise.clamp_(-config.eps, config.eps)
            # the masks: the perturbed loss (the adversary fixed) and the clean one
            mask_opt.zero_grad()
            perturbed = loss_fn(classifier(x), y)
            masks.perturbed = False
            clean = loss_fn(classifier(x), y)
            (config.tradeoff * clean + (1 - config.tradeoff) * perturbed).backward()
            mask_opt.step()
            with torch.no_grad():
                for mask in masks.masks.values():
                    mask.clamp_(0.0, 1.0)
            if progress:
                progress(step + 1, config.iterations)
    return masks.values()


def flagged_by_masks(values: dict[str, np.ndarray], threshold: float) -> dict[str, list[int]]:
    return {name: np.flatnonzero(v < threshold).tolist() for name, v in values.items()}
