"""Feature map testing, gradient mode (the published method).

For every Conv layer l and output channel c: from a random start x0 inside the
L-inf ball around the clean images x, one signed-gradient step on
``MSE(F_lc(x0), F_lc(x))`` at two sizes (alpha, 2*alpha), each projected back
onto the eps ball and [0, 1]; the channel's scores are the model's top-1
accuracy on the two candidate batches. ``steps > 1`` first takes ``steps - 1``
projected steps of size alpha on the same loss (iterated FMT; ``steps=1`` is
the published method exactly).

Speed without changing results: the forward pass stops at layer l (nothing
after it affects the gradient); the first step of every channel of a layer
shares one forward pass of x0, kept for one backward pass per channel; the
candidate batches of many channels go through one prediction call (ONNX Runtime
when a predictor is given). Stacking channels as replicas of the batch in one
forward/backward — the previous engine — was 2.6 times slower than the
per-channel loop on a 2-core CPU (benchmarks/README.md, Speed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fmt_audit.backends.torch.bridge import BridgedClassifier, TorchBridge
from fmt_audit.data import Preprocessing
from fmt_audit.fmt.scores import ChannelScores
from fmt_audit.model.graph import ConvLayer


class _Stop(Exception):
    """Raised by a forward hook to end the forward pass at the layer under test."""


@dataclass(frozen=True)
class GradientTestConfig:
    eps: float = 0.06
    alpha: float = 0.02
    steps: int = 1
    seed: int = 0
    max_batch: int = 2048   # candidate images per prediction call (2 per channel x samples)
    # images whose forward pass is kept for the backward passes at once; None: all of them.
    # Each image's gradient is its own (eval mode), so splitting changes no result except,
    # possibly, by float rounding where a kernel differs with the batch size.
    gradient_batch: int | None = None
    predict_batch: int = 256    # images per call when the torch module predicts


def layer_output(classifier: BridgedClassifier, layer: str, x: torch.Tensor) -> torch.Tensor:
    """Conv layer ``layer``'s output for pixel-space images ``x``; the forward pass stops there."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output)
        raise _Stop

    handle = classifier.bridge.conv_modules[layer].register_forward_hook(hook)
    try:
        classifier(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def random_start(x: np.ndarray, alpha: float, seed: int) -> np.ndarray:
    """x0 = clip(x + alpha * sign(U(-alpha, alpha)), 0, 1), seeded."""
    noise = np.random.default_rng(seed).uniform(-alpha, alpha, size=x.shape).astype(np.float32)
    return np.clip(x + alpha * np.sign(noise), 0.0, 1.0).astype(np.float32)


class FeatureMapTester:
    """Scores the channels of Conv layers of one model on one clean batch."""

    def __init__(self, bridge: TorchBridge, x: np.ndarray, y: np.ndarray, num_classes: int,
                 preprocessing: Preprocessing, config: GradientTestConfig, device: str = "cpu",
                 predictor: Callable[[np.ndarray], np.ndarray] | None = None):
        # top-1 predictions for [0, 1] images, e.g. MaskedModel.predict (ONNX Runtime runs
        # the candidate batches 2-4x faster than the torch module on a CPU); None: the module
        self.predictor = predictor
        self.classifier = BridgedClassifier(bridge, preprocessing, device)
        self.classifier.module.eval()
        for parameter in self.classifier.module.parameters():
            parameter.requires_grad_(False)
        self.config = config
        self.x = torch.from_numpy(x).to(device)
        self.labels = y
        self.num_classes = num_classes
        self.x0 = torch.from_numpy(random_start(x, config.alpha, config.seed)).to(device)

    def features(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        """The Conv layer's output for pixel-space images ``x``; the forward stops there."""
        return layer_output(self.classifier, layer, x)

    def predict(self, x: torch.Tensor) -> np.ndarray:
        """``[k, N]`` top-1 predictions (x holds k candidate batches of the N images, one after another)."""
        if self.predictor is not None:
            return self.predictor(x.detach().cpu().numpy()).reshape(-1, len(self.labels))
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), self.config.predict_batch):
                out.append(self.classifier(x[start:start + self.config.predict_batch]).argmax(1))
        return torch.cat(out).view(-1, len(self.labels)).cpu().numpy()

    def clean_accuracy(self) -> float:
        return float((self.predict(self.x) == self.labels).mean())

    def _gradient(self, layer: str, x0: torch.Tensor, reference: torch.Tensor, channel: int, normaliser: int,
                  feature: torch.Tensor | None = None) -> torch.Tensor:
        """d MSE(F_lc(x0), F_lc(x)) / d x0; ``feature`` reuses a retained forward pass of ``x0``.

        The MSE is over all N images' maps (``normaliser`` elements) even when ``x0``
        holds a part of them, so a part's gradient is the same as the whole batch's.
        """
        if feature is None:
            x0 = x0.detach().requires_grad_(True)
            with torch.enable_grad():
                feature = self.features(layer, x0)
        with torch.enable_grad():
            loss = ((feature[:, channel] - reference[:, channel]) ** 2).sum() / normaliser
            (grad,) = torch.autograd.grad(loss, x0, retain_graph=True)
        return grad

    def _retained(self, layer: str, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The random start of images ``part`` and its forward pass to ``layer``, kept for backward passes."""
        x0 = self.x0[part].detach().requires_grad_(True)
        with torch.enable_grad():
            return x0, self.features(layer, x0)

    def score_layer(self, layer: ConvLayer, channels: Sequence[int] | None = None,
                    progress: Callable[[int], None] | None = None) -> ChannelScores:
        """Accuracy and class shift on the alpha and 2*alpha candidates of each channel."""
        cfg = self.config
        n = len(self.labels)
        channels = list(range(layer.out_channels)) if channels is None else list(channels)
        step = min(cfg.gradient_batch or n, n)
        parts = [slice(start, min(start + step, n)) for start in range(0, n, step)]
        with torch.no_grad():
            reference = torch.cat([self.features(layer.name, self.x[part]) for part in parts])   # F_l(x)
        normaliser = reference[:, 0].numel()
        lower = (self.x - cfg.eps).clamp(0.0, 1.0)
        upper = (self.x + cfg.eps).clamp(0.0, 1.0)
        # every channel's first step starts from the same x0: one forward pass, kept (per part
        # and chunk when the images are split, since only one part's graph is kept at a time)
        retained = self._retained(layer.name, parts[0]) if len(parts) == 1 else None
        per_chunk = max(1, cfg.max_batch // (2 * n))     # channels whose candidates go in one prediction call
        scores = ChannelScores.empty(len(channels), 2)
        for start in range(0, len(channels), per_chunk):
            chunk = channels[start:start + per_chunk]
            candidates = torch.empty((len(chunk), 2, *self.x.shape), dtype=self.x.dtype, device=self.x.device)
            for part in parts:
                x0, shared = retained or self._retained(layer.name, part)
                low, high = lower[part], upper[part]
                for row, channel in enumerate(chunk):
                    grad = self._gradient(layer.name, x0, reference[part], channel, normaliser, feature=shared)
                    point = x0.detach()
                    for _ in range(cfg.steps - 1):
                        point = torch.minimum(torch.maximum(point + cfg.alpha * grad.sign(), low), high)
                        grad = self._gradient(layer.name, point, reference[part], channel, normaliser)
                    direction = grad.sign()
                    for column, size in enumerate((cfg.alpha, 2 * cfg.alpha)):
                        candidates[row, column, part] = torch.minimum(torch.maximum(point + size * direction, low),
                                                                      high)
                del shared
            predictions = self.predict(candidates.view(-1, *self.x.shape[1:])).reshape(len(chunk), 2, n)
            scores.record(start, predictions, self.labels, self.num_classes)
            if progress:
                progress(len(chunk))
        return scores


class FeatureMapPerturbation:
    """Images that each disturb one random feature map: FMT's test inputs, made for training.

    For a batch, one Conv layer is drawn (in proportion to its channel count, so
    every channel is equally likely) and one of its channels per image; from a
    random start, ``steps`` signed-gradient steps of size ``alpha`` on the squared
    change of that image's feature map, inside the L-inf ball of radius ``eps``
    and [0, 1]. The model is run in eval mode for this and restored after.
    Repair fine-tunes on these images with their true labels: disturbing a
    backdoor feature map sends predictions to the attack's target, so training
    them back to the true class unlearns the trigger's effect.
    """

    def __init__(self, classifier: BridgedClassifier, layers: Sequence[ConvLayer], eps: float, alpha: float,
                 steps: int, seed: int = 0):
        self.classifier = classifier
        self.layers = list(layers)
        self.eps, self.alpha, self.steps = eps, alpha, steps
        self.rng = np.random.default_rng(seed)
        sizes = np.array([layer.out_channels for layer in self.layers], dtype=np.float64)
        self.layer_share = sizes / sizes.sum()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.classifier.module
        training = module.training
        module.eval()
        try:
            layer = self.layers[self.rng.choice(len(self.layers), p=self.layer_share)]
            channel = torch.from_numpy(self.rng.integers(0, layer.out_channels, size=len(x))).to(x.device)
            rows = torch.arange(len(x), device=x.device)
            self.last = (layer.name, channel)       # what the latest batch disturbed
            with torch.no_grad():
                reference = layer_output(self.classifier, layer.name, x)[rows, channel]
            start = torch.from_numpy(random_start(x.detach().cpu().numpy(), self.alpha, int(self.rng.integers(2**31))))
            x0 = start.to(x.device)
            lower, upper = (x - self.eps).clamp(0.0, 1.0), (x + self.eps).clamp(0.0, 1.0)
            for _ in range(self.steps):
                x0 = x0.detach().requires_grad_(True)
                with torch.enable_grad():
                    feature = layer_output(self.classifier, layer.name, x0)[rows, channel]
                    (grad,) = torch.autograd.grad(((feature - reference) ** 2).sum(), x0)
                x0 = torch.minimum(torch.maximum(x0.detach() + self.alpha * grad.sign(), lower), upper)
            return x0.detach()
        finally:
            module.train(training)
