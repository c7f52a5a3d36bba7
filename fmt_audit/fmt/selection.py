"""Which channels of a layer to flag, from their feature-map test scores.

Selection works on a ``[C, k]`` score matrix (one column per candidate batch)
oriented so that *higher is more suspicious*: ``1 - accuracy`` (the published score) or the class shift (see
:mod:`fmt_audit.fmt.scores`).

``kmeans`` is the paper's rule: 2-means on the channels' score pairs, flag the
smaller cluster — it flags channels in every layer, even in a clean model.
``outlier`` flags only channels whose suspicion stands far above the rest of
their layer (a one-sided robust z-score: median and MAD), so a layer with no
outlier flags nothing.

Both detect the degenerate case — every channel scored the same, so there is
nothing to separate — and flag nothing there, saying so.

``trace`` is not a per-layer rule: the scan flags the channels that carry the verdict's reversed trigger
(:mod:`fmt_audit.fmt.trace`), whatever the layer scores say; the scores are still computed and reported.

``auto`` (the default) is resolved by the run (:func:`resolve_selection`): ``trace`` for a scan with the
``combined`` verdict and for a repair that chooses its own channels and checks itself with it, ``outlier``
elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

AUTO_SELECTION = "auto"
SELECTIONS = (AUTO_SELECTION, "kmeans", "outlier", "trace")
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class Selection:
    flagged: list[int]
    degenerate: bool
    statistics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"degenerate": self.degenerate, **self.statistics}


def _degenerate(scores: np.ndarray) -> bool:
    return len(scores) < 2 or bool(np.all(scores == scores[0]))


def select_kmeans(scores: np.ndarray, seed: int = 0) -> Selection:
    """2-means over the ``[C, k]`` suspicion rows; flag the smaller cluster (ties: the more suspicious one)."""
    if _degenerate(scores):
        return Selection([], True, {"rule": "kmeans"})
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(scores)
    sizes = np.bincount(labels, minlength=2)
    means = [scores[labels == k].mean() for k in range(2)]
    if sizes[0] != sizes[1]:
        chosen = int(np.argmin(sizes))
    else:
        chosen = int(np.argmax(means))
    flagged = np.flatnonzero(labels == chosen).tolist()
    return Selection(flagged, False, {"rule": "kmeans", "cluster_sizes": sizes.tolist(),
                                      "cluster_mean_scores": [round(float(m), 6) for m in means]})


def select_outliers(scores: np.ndarray, threshold: float = 3.5, samples: int | None = None) -> Selection:
    """Flag channels whose suspicion is far *above* their layer's median: robust z > threshold.

    A channel's suspicion is that of its most disruptive candidate batch (the row maximum).

    z = (score - median) / scale, scale = max(1.4826 * MAD, binomial noise of a
    share measured on ``samples`` images). The floor matters when most channels
    score the same (MAD = 0): a change of an image or two is noise, not an outlier.
    """
    values = scores.max(axis=1) if scores.ndim == 2 else scores
    if _degenerate(values):
        return Selection([], True, {"rule": "outlier", "threshold": threshold})
    median, mad, noise = _robust_center_scale(values, samples)
    z = _z(values, median, mad, noise)
    flagged = np.flatnonzero(z > threshold).tolist()
    return Selection(flagged, False, {
        "rule": "outlier", "threshold": threshold, "median": round(median, 6), "mad": round(mad, 6),
        "noise_floor": round(noise, 6), "scale": round(max(MAD_TO_SIGMA * mad, noise, 1e-12), 6),
        "max_z": round(float(z.max()), 4)})


def _robust_center_scale(values: np.ndarray, samples: int | None) -> tuple[float, float, float]:
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    noise = 0.0
    if samples:
        p = min(max(median, 1 / samples), 1 - 1 / samples)
        noise = float(np.sqrt(p * (1 - p) / samples))
    return median, mad, noise


def robust_z(values: np.ndarray, samples: int | None = None) -> np.ndarray:
    """(value - median) / max(1.4826 * MAD, binomial noise floor), per channel of one layer."""
    return _z(values, *_robust_center_scale(values, samples))


def _z(values: np.ndarray, median: float, mad: float, noise: float) -> np.ndarray:
    return (values - median) / max(MAD_TO_SIGMA * mad, noise, 1e-12)


def resolve_selection(selection: str, traceable: bool) -> str:
    """The rule ``selection`` stands for: ``auto`` is ``trace`` where the run can trace (``traceable``: a scan
    whose verdict is ``combined``, a repair that removes channels it chooses itself with the ``combined``
    verdict as its check, or ``compare``'s ``fmt``), else ``outlier``.

    The trace became the default repair's selection when it beat the per-channel test followed by the same
    unlearning on held-out models (docs/research/set-selection.md), and the default scan's when its channels
    alone took out more of the backdoor than the per-channel test's flags on new models
    (docs/research/scan-trace-h2h.md).
    """
    if selection != AUTO_SELECTION:
        return selection
    return "trace" if traceable else "outlier"


def select(scores: np.ndarray, rule: str, seed: int = 0, threshold: float = 3.5,
           samples: int | None = None) -> Selection:
    if rule == "kmeans":
        return select_kmeans(scores, seed)
    if rule == "outlier":
        return select_outliers(scores, threshold, samples)
    if rule == "trace":     # chosen over the whole model after the verdict (fmt_audit.fmt.scan)
        return Selection([], _degenerate(scores.max(axis=1) if scores.ndim == 2 else scores), {"rule": "trace"})
    raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}; got {rule!r}")
