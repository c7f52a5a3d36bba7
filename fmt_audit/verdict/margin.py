"""``margin``: the maximum-margin test of MM-BD (Wang et al., IEEE S&P 2024), the fast data-free verdict.

A backdoor's target class reaches a far larger margin over the other classes than any ordinary class can
(the margins: :mod:`fmt_audit.verdict.evidence.margins`). The largest class margin is compared with a Gamma
distribution (location 0, maximum likelihood) fitted to the other classes' margins; its order-statistic
p-value ``p = 1 - F(m_max)^(K-1)`` gives the suspicion ``1 - p``, ``suspicious`` at p < 0.05 (MM-BD's
threshold). No data needed. Classes that are easy to reach in clean models (natural attractors) stand out
too: on held-out populations it called about 4 in 10 clean models suspicious (docs/research/).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fmt_audit.verdict.base import ClassFigure, Verdict, VerdictInputs, VerdictMethod
from fmt_audit.verdict.config import VerdictConfig

FLOOR = 1e-6      # margins at or below 0 (a class no start reached) count as this share of the largest


class MarginMethod(VerdictMethod):
    name = "margin"
    threshold = 0.95    # 1 - p at or above this (p < 0.05, MM-BD's threshold)
    needs_data = False
    summary = "the maximum-margin test (MM-BD): data-free and fast, but often fooled by natural attractor classes"

    def gather(self, inputs: VerdictInputs, config: VerdictConfig) -> Verdict:
        from fmt_audit.verdict.evidence.margins import margin_test

        loaded = inputs.loaded
        margins, notes = margin_test(loaded.classifier, loaded.image_input, inputs.preprocessing, inputs.device,
                                     config.margin(), inputs.bridge)
        basis = f"maximum-margin test, {config.margin_restarts} starts x {config.margin_steps} steps per class"
        return margin_verdict(margins, "; ".join([basis, *notes]))

    def evidence(self, verdict: dict) -> str:
        ordered = sorted(verdict["margins"], reverse=True)
        return (f"class {verdict['target_class']} reaches margin {ordered[0]:.3g}, the next class {ordered[1]:.3g}; "
                f"p = {verdict['p_value']:.2g}")

    def figures(self, verdict: dict) -> list[ClassFigure]:
        return [ClassFigure("Maximum-margin test", "The largest margin over the other classes that gradient ascent "
                            "reached for each class. A backdoor's target reaches far more than the rest.",
                            verdict["margins"], "largest margin reached")]


MARGIN = MarginMethod()


def margin_verdict(margins: Sequence[float], basis: str = "maximum-margin test") -> Verdict:
    """The verdict from each class's maximum margin (:func:`fmt_audit.verdict.evidence.margins.max_margins`)."""
    from scipy import stats

    values = np.asarray(margins, dtype=float)
    if len(values) < 3 or not np.isfinite(values).all():
        return MARGIN.inconclusive(f"{basis}: needs finite margins of at least 3 classes")
    top = int(values.argmax())
    largest = float(values[top])
    if largest <= 0:    # no class could be pushed above the others: nothing stands out
        return MARGIN.inconclusive(f"{basis}: no class reached a positive margin")
    floored = np.maximum(values, FLOOR * largest)
    rest = np.delete(floored, top)
    if np.ptp(rest) <= 1e-12 * largest:     # a Gamma cannot be fitted to equal values
        p_value = 0.0 if largest > rest[0] * (1 + 1e-9) else 1.0
    else:
        shape, _, scale = stats.gamma.fit(rest, floc=0)
        # 1 - (1 - sf)^n without the rounding of 1 - cdf^n, so that tiny p-values stay apart
        tail = float(stats.gamma.sf(largest, shape, loc=0, scale=scale))
        p_value = float(-np.expm1(len(rest) * np.log1p(-tail))) if tail < 1 else 1.0
    p_value = min(max(p_value, 0.0), 1.0)
    return MARGIN.decided(round(1.0 - p_value, 6), top, basis,
                          {"p_value": float(f"{p_value:.6g}"), "margins": [round(float(v), 4) for v in values]})
