"""Is this model backdoored? A model-level suspicion score from the scan's class sinks.

A backdoor gives the network a shortcut to one class: disturbing almost any
feature map with FMT's gradient test then pushes the images into that class,
whatever the channel. In a clean model the disturbed predictions scatter over
several classes. The suspicion score is the **sink concentration**: over every
(channel, candidate batch) whose class shift reaches :data:`MIN_SHIFT`, weighted
by the shift, the share that went to the single most common sink class.

Measured on the bundled samples (gradient preset): clean 0.40, BadNets 1.00,
blended 0.99. Mask-mode tests show no such signal (0.18-0.26 on all three), so a
mask-mode scan gets its verdict from a probe: the gradient test on a seeded
sample of channels (``ScanConfig.verdict_probe``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

MIN_SHIFT = 0.2          # a candidate batch counts when it pushed >= 20% of the images into one wrong class
MIN_PAIRS = 8            # fewer counting candidates than this: too little evidence for a verdict
THRESHOLD = 0.75         # suspicion at or above this: "suspicious" (see benchmarks/README.md, Verdict)


@dataclass(frozen=True)
class Verdict:
    suspicion: float | None     # sink concentration in [0, 1]; None without evidence
    verdict: str                # "clean" | "suspicious" | "inconclusive"
    sink_class: int | None      # the class the disturbed predictions went to most
    counted: int                # candidate batches with shift >= MIN_SHIFT
    tested: int                 # candidate batches in all
    basis: str                  # what the channels were: "scan" (gradient mode) or "probe of K channels"

    def to_dict(self) -> dict:
        return {"suspicion": self.suspicion, "verdict": self.verdict, "sink_class": self.sink_class,
                "counted": self.counted, "tested": self.tested, "threshold": THRESHOLD,
                "min_shift": MIN_SHIFT, "basis": self.basis}


def sink_concentration(shifts: Iterable[Sequence[Sequence[float]]], sinks: Iterable[Sequence[Sequence[int]]],
                       basis: str = "scan") -> Verdict:
    """The verdict from per-layer ``[C, k]`` class shifts and their sink classes."""
    weight: dict[int, float] = {}
    counted = tested = 0
    for layer_shift, layer_sink in zip(shifts, sinks):
        shift = np.asarray(layer_shift, dtype=float).ravel()
        sink = np.asarray(layer_sink, dtype=np.int64).ravel()
        tested += len(shift)
        use = (shift >= MIN_SHIFT) & (sink >= 0)
        counted += int(use.sum())
        for cls, value in zip(sink[use].tolist(), shift[use].tolist()):
            weight[cls] = weight.get(cls, 0.0) + value
    if counted < MIN_PAIRS:
        return Verdict(None, "inconclusive", None, counted, tested, basis)
    sink_class = max(sorted(weight), key=weight.__getitem__)
    suspicion = round(weight[sink_class] / sum(weight.values()), 6)
    return Verdict(suspicion, "suspicious" if suspicion >= THRESHOLD else "clean", sink_class, counted, tested,
                   basis)
