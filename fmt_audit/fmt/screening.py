"""Screen, then confirm: every channel on a first share of the images, the exact test only where it matters.

The outlier rule (:func:`fmt_audit.fmt.selection.select_outliers`) flags a channel whose suspicion stands
more than ``threshold`` robust standard deviations above its layer's median. Most channels sit in the bulk,
and a test on a quarter of the images already shows it: the screen tests every channel of a layer on the
first ``N / 4`` images (at least :data:`SCREEN_MIN_IMAGES`), and only channels within
:data:`CONFIRM_MARGIN` of the threshold by the screen's own statistics are tested again on all ``N``
(*confirmed*). A confirmed channel is flagged on its exact score; one that was not is never flagged; the
layer's median and scale come from the screen (:func:`screened_layer` says how).

The budget ``exact`` tests every channel on all images (the published method's cost); ``fast`` screens
where the selection is the outlier rule and the sample is large enough to make it worth it. The report
says, per layer, which channels were confirmed (``selection.screen``); ``benchmarks/speed.py`` measures
the flagged sets of both budgets side by side.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fmt_audit.fmt.scores import ChannelScores
from fmt_audit.fmt.selection import MAD_TO_SIGMA, Selection, _degenerate, robust_z
from fmt_audit.model.graph import ConvLayer

BUDGETS = ("fast", "exact")
SCREEN_SHARE = 4            # the screen runs on the first 1/SCREEN_SHARE of the images
SCREEN_MIN_IMAGES = 32
# channels the screen puts less than this many robust standard deviations below the outlier threshold are
# confirmed: a channel exactly at the threshold is missed only when its screened score falls 2 of its
# noise's standard deviations low (the screen's scale is at least that noise), about 2% of the time
CONFIRM_MARGIN = 2.0


def screen_size(samples: int, budget: str, selection: str) -> int | None:
    """Images the screen runs on, or None where every channel is tested on all ``samples`` images."""
    if budget != "fast" or selection != "outlier":
        return None
    size = max(SCREEN_MIN_IMAGES, samples // SCREEN_SHARE)
    return size if 2 * size <= samples else None


def screened_layer(screen, full, layer: ConvLayer, suspicion: Callable[[ChannelScores], np.ndarray],
                   threshold: float, screen_images: int, samples: int,
                   progress: Callable[[int], None] | None = None) -> tuple[ChannelScores, Selection]:
    """Scores of every channel of ``layer`` (exact from the ``full`` tester, on ``samples`` images, for the
    channels the screen cannot rule out; from the ``screen`` tester, on its ``screen_images``, for the rest)
    and the outlier rule's selection on them.

    The layer's median and scale come from the screen, where every channel was measured alike: the median
    as it is, the scale with the extra binomial noise of the smaller sample taken out (a share ``p`` measured
    on ``n`` images varies by ``p (1 - p) / n``), so that it estimates the scale the exact test would see;
    the noise floor is the exact test's. Only confirmed channels can be flagged, on their exact scores.
    """
    screened = screen.score_layer(layer, progress=progress)
    values = suspicion(screened).max(axis=1)
    if _degenerate(values):
        return screened, Selection([], True, {"rule": "outlier", "threshold": threshold,
                                              "screen": {"images": screen_images, "confirmed": []}})
    confirmed = np.flatnonzero(robust_z(values, screen_images) > threshold - CONFIRM_MARGIN)
    scores = ChannelScores(screened.accuracy.copy(), screened.shift.copy(), screened.sink.copy())
    if len(confirmed):
        exact = full.score_layer(layer, confirmed.tolist())
        for table, source in ((scores.accuracy, exact.accuracy), (scores.shift, exact.shift),
                              (scores.sink, exact.sink)):
            table[confirmed] = source
    median = float(np.median(values))
    spread = MAD_TO_SIGMA * float(np.median(np.abs(values - median)))
    p = min(max(median, 1 / samples), 1 - 1 / samples)
    extra = p * (1 - p) * (1 / screen_images - 1 / samples)
    noise = float(np.sqrt(p * (1 - p) / samples))
    scale = max(float(np.sqrt(max(spread ** 2 - extra, 0.0))), noise, 1e-12)
    z = (suspicion(scores).max(axis=1)[confirmed] - median) / scale
    flagged = sorted(confirmed[z > threshold].tolist())
    return scores, Selection(flagged, False, {
        "rule": "outlier", "threshold": threshold, "median": round(median, 6), "scale": round(scale, 6),
        "noise_floor": round(noise, 6), "max_z": round(float(z.max()), 4) if len(z) else None,
        "screen": {"images": screen_images, "confirmed": confirmed.tolist()}})
