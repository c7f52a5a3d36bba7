"""Feature map testing, mask mode: forward passes only, entirely in ONNX Runtime.

Each channel gets three candidate batches through its Mul mask: the clean batch
with the channel removed (mask 0), amplified (mask ``gain``) and inverted and
amplified (mask ``-gain``). The scores are the model's accuracy and class
shift on each (see :mod:`fmt_audit.fmt.scores`).

Why the inverted setting: a backdoor feature map is mostly silent on clean
images — its pre-activation is negative, so a positive gain keeps it silent
after the ReLU, while a negative gain makes it fire wherever it was silent,
which is what the trigger does. Many settings run in one session call: the batch is
replicated once per (channel, setting) and each replica gets its own mask row.
No PyTorch conversion is needed, so this mode covers every graph ORT runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fmt_audit.backends.onnxrt.masked import MaskedModel
from fmt_audit.fmt.scores import ChannelScores
from fmt_audit.model.graph import ConvLayer


@dataclass(frozen=True)
class MaskTestConfig:
    gain: float = 10.0
    max_batch: int = 2048   # images per session call (replicas x samples)


class MaskTester:
    """Scores the channels of Conv layers by removing and amplifying each one."""

    def __init__(self, model: MaskedModel, x: np.ndarray, y: np.ndarray, num_classes: int,
                 config: MaskTestConfig):
        self.model = model
        self.x = x
        self.labels = y
        self.num_classes = num_classes
        self.config = config
        self.settings = (0.0, config.gain, -config.gain)

    def clean_accuracy(self) -> float:
        return float((self.model.predict(self.x) == self.labels).mean())

    def score_layer(self, layer: ConvLayer, channels: Sequence[int] | None = None,
                    progress: Callable[[int], None] | None = None) -> ChannelScores:
        """Accuracy and class shift with each channel removed, amplified and inverted (columns 0, 1, 2)."""
        n = len(self.labels)
        channels = list(range(layer.out_channels)) if channels is None else list(channels)
        per_chunk = max(1, self.config.max_batch // (n * len(self.settings)))
        scores = ChannelScores.empty(len(channels), len(self.settings))
        for start in range(0, len(channels), per_chunk):
            chunk = channels[start:start + per_chunk]
            replicas = [(channel, value) for channel in chunk for value in self.settings]
            mask = np.ones((len(replicas) * n, layer.out_channels, 1, 1), np.float32)
            for r, (channel, value) in enumerate(replicas):
                mask[r * n:(r + 1) * n, channel] = value
            # other layers run with ones; only the part of the graph after this layer runs per replica
            predictions = self.model.replicated_predictions(layer.name, self.x, mask).reshape(
                len(chunk), len(self.settings), n)
            scores.record(start, predictions, self.labels, self.num_classes)
            if progress:
                progress(len(chunk))
        return scores
