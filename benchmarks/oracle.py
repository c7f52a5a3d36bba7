"""Ground truth for benchmarks: which feature maps respond to a known trigger.

When the trigger is known (a model we poisoned ourselves), the backdoor feature
maps can be measured directly: a channel is trigger-responsive when its peak
activation (spatial maximum of the feature map) on triggered images departs
from its peak on the *same* images without the trigger by more than
``threshold`` standard deviations of the clean peaks. Coverage of a scan is
the share of these channels it flags. Users auditing a model do not have this;
it exists to measure the scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmt_audit.backends.onnxrt.masked import MaskedModel


@dataclass(frozen=True)
class TriggerResponse:
    """Per layer, each channel's peak shift in clean-peak standard deviations, and the responsive channels."""

    shift: dict[str, np.ndarray]
    threshold: float

    @property
    def channels(self) -> dict[str, list[int]]:
        return {name: np.flatnonzero(z > self.threshold).tolist() for name, z in self.shift.items()}

    @property
    def count(self) -> int:
        return sum(len(c) for c in self.channels.values())

    def hits(self, flagged: dict[str, list[int]]) -> int:
        """How many trigger-responsive channels are in ``flagged``."""
        return sum(len(set(c) & set(flagged.get(name, ()))) for name, c in self.channels.items())

    def coverage(self, flagged: dict[str, list[int]]) -> float:
        """Share of trigger-responsive channels in ``flagged`` (``nan`` when there are none)."""
        return self.hits(flagged) / self.count if self.count else float("nan")


def trigger_response(model: MaskedModel, clean: np.ndarray, triggered: np.ndarray,
                     threshold: float = 3.0) -> TriggerResponse:
    """Compare each channel's peaks on ``triggered`` images with those on the same ``clean`` images."""
    if clean.shape != triggered.shape:
        raise ValueError(f"clean and triggered images must pair up; got {clean.shape} and {triggered.shape}")
    clean_peaks = model.peaks(clean)
    triggered_peaks = model.peaks(triggered)
    shift = {}
    for name, base in clean_peaks.items():
        spread = base.std(axis=0)
        delta = np.abs(triggered_peaks[name].mean(axis=0) - base.mean(axis=0))
        # a channel that never varies on clean images responds if it moves at all
        shift[name] = np.where(spread > 0, delta / np.maximum(spread, 1e-12), np.where(delta > 0, np.inf, 0.0))
    return TriggerResponse(shift, threshold)
