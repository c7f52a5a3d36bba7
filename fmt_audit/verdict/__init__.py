"""Is this model backdoored? A model-level suspicion score and verdict.

The statistics, chosen by ``ScanConfig.verdict``:

``margin`` (the default): the **maximum-margin test** of MM-BD (Wang et al.,
IEEE S&P 2024; the margins come from :mod:`fmt_audit.verdict.margin`). A backdoor's
target class reaches a far larger margin over the other classes than any
ordinary class can. The largest class margin is compared with a Gamma
distribution (location 0, maximum likelihood) fitted to the other classes'
margins; its order-statistic p-value ``p = 1 - F(m_max)^(K-1)`` gives the
suspicion ``1 - p``, ``suspicious`` at p < 0.05 (MM-BD's threshold). No data
needed. In tests fixed before the models were trained (benchmarks/README.md,
Verdict) it scores ROC-AUC 0.883 on 52 digit models and 0.688 on 32 MNIST,
CIFAR-10 and GTSRB models, and calls about 4 in 10 clean models suspicious at
that threshold: classes that are easy to reach in clean models (natural
attractors) stand out too.

``sink``: the **sink concentration** of FMT's gradient test. Disturbing almost any
feature map of a backdoored model pushes the images into the target class;
in a clean model the disturbed predictions scatter. Over every (channel,
candidate batch) whose class shift reaches :data:`MIN_SHIFT`, weighted by the
shift, the share that went to the single most common class. A mask-mode scan
gets it from a probe: the gradient test on a seeded sample of channels
(``ScanConfig.verdict_probe``).

``universal``: a **trigger search** (:mod:`fmt_audit.verdict.evidence.universal`). One perturbation
per class, grown on a ladder of L2 budgets until it sends 90% of held-out images
of the other classes to some class; the suspicion is that class's lead over the
next class there, ``suspicious`` at 0.2 (the Youden cut on development models,
benchmarks/README.md, "Trigger search"). Needs labelled data.

``transfer``: the maximum-margin test, **discounted by transfer** (:mod:`fmt_audit.verdict.evidence.transfer`).
A class can have a large margin because the data makes it easy (a natural attractor)
or because the model carries a shortcut to it (a backdoor). The universal ladder's
perturbation for the margin test's class is applied to small clean networks trained
on the scan's own images (:mod:`fmt_audit.verdict.evidence.reference`): a natural shortcut moves them
too, a backdoor's does not. The suspicion is ``(1 - p) * (1 - t)``, ``t`` the share of
held-out images the perturbation moves into that class in the references beyond
those already there; ``suspicious`` at 0.95 as for ``margin``. It can only lower the
margin test's suspicion. Needs labelled data.

``shortcut``: the **untransferred margin gap** of the same ladder and references. Per class, the median
margin its last-rung perturbation gives the held-out images of the other classes in the audited model, less
the margin the same perturbation adds in the references (:func:`untransferred_margins`): what the model's own
shortcut buys beyond what the data's does. The suspicion is how far the largest stands from the next one,
relative to how far it stands from the median class: 1 when one class alone is reachable, 0 when two tie.
``suspicious`` at 0.55 (the Youden cut on development models, benchmarks/README.md, "Verdict"). Unlike
``transfer`` it reads every class, so a natural attractor ahead of the target does not hide it. Needs
labelled data.

``untransferred``: the **universal lead, less what transfers**, from the same ladder and references. Per
class, the share of held-out images of the other classes its last-rung perturbation sends there in the
audited model, less the share it moves there in the references (:func:`transferred`); the suspicion is the
largest such share's lead over the next, as ``universal`` reads its lead, ``suspicious`` at the same 0.2.
A natural attractor, which the clean references share, loses its lead; a backdoor's target, which they do
not, keeps it. Chosen on two development populations together (benchmarks/README.md, "Developed on two
populations"; ROC-AUC 0.895 and 0.902 there), it scored 0.759 on 136 fresh models, where every statistic
here scored 0.76-0.80. Needs labelled data.

``cleanse``: **Neural Cleanse** (Wang et al., IEEE S&P 2019; :mod:`fmt_audit.verdict.evidence.cleanse`). Per class, the
smallest mask-and-pattern trigger that sends the other classes' images there; the *anomaly index* of the
smallest mask's L1 norm, how far below the median class's it stands in robust standard deviations
(:func:`anomaly_index`), as the suspicion ``a / (a + 2)``, ``suspicious`` from the paper's ``a = 2`` (0.5).
A patch trigger is small in L1 though large in L2, where the ``universal`` ladder does not reach. Needs
labelled data.

``combined``: both families of evidence, each over its own cut. The trigger search's **mask ratio**, how
many times smaller the smallest class's mask is than the median class's (:func:`mask_ratio`; a ratio of
:data:`COMBINED_RATIO` counts as 1, on a log scale), and the ``untransferred`` lead (:data:`COMBINED_LEAD`
counts as 1); the larger of the two, ``v``, as the suspicion ``v / (v + 1)``, ``suspicious`` from 0.5 (when
either is over its cut), naming the class of the one further over. The ratio, not Neural Cleanse's
MAD-scaled index: a clean model whose classes need near-equal masks has a tiny spread that inflates the index
of a merely ordinary smallest class. Chosen on the kept figures of (D)-(F) with the lead counting from the
untransferred threshold, 0.2: ROC-AUC 0.899 on the fresh (G) (benchmarks/README.md, session 16), where the
lead's false positives cost most; the lead's cut then moved to 0.35 on (D)-(G) (session 17). Then two checks
on the class named (session 18): do the two tests name the same class, and is it the class smooth random
images fall into most (:mod:`fmt_audit.verdict.evidence.smooth`)? Each check that agrees multiplies ``v`` by the square root of
:data:`COMBINED_AGREEMENT`, each that does not divides it; a check without its evidence is left out.
Needs labelled data; costs the two tests together, and 1024 forward passes for the smooth images.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fmt_audit.errors import ConfigError

METHODS = ("margin", "sink", "universal", "transfer", "shortcut", "untransferred", "cleanse", "combined", "none")
MIN_SHIFT = 0.2          # sink: a candidate batch counts when it pushed >= 20% of the images into one wrong class
MIN_PAIRS = 8            # sink: fewer counting candidates than this is too little evidence for a verdict
SINK_THRESHOLD = 0.75    # sink: suspicion at or above this is "suspicious" (benchmarks/README.md, Verdict)
MARGIN_THRESHOLD = 0.95  # margin: 1 - p at or above this (p < 0.05, MM-BD's threshold) is "suspicious"
UNIVERSAL_THRESHOLD = 0.2  # universal: lead at or above this is "suspicious" (benchmarks/README.md, Verdict)
TRANSFER_THRESHOLD = 0.95  # transfer: the discounted 1 - p at or above this is "suspicious" (MM-BD's p < 0.05)
SHORTCUT_THRESHOLD = 0.55  # shortcut: gap at or above this is "suspicious" (benchmarks/README.md, Verdict)
# untransferred: lead at or above this is "suspicious": universal's threshold, which the Youden cut on the
# development populations (D) and (E) together, 0.204, confirmed (benchmarks/README.md, Verdict)
UNTRANSFERRED_THRESHOLD = UNIVERSAL_THRESHOLD
# cleanse: Neural Cleanse flags an anomaly index above 2; the suspicion a / (a + 2) is 0.5 there
CLEANSE_INDEX = 2.0
CLEANSE_THRESHOLD = 0.5     # the suspicion a / (a + CLEANSE_INDEX) at a = CLEANSE_INDEX
# combined: the median class's mask this many times the smallest's counts as 1 (as the untransferred threshold
# does); the cut with the largest TPR - FPR on the kept figures of (D)-(F), 2-3 all within 0.01 of its ROC-AUC
COMBINED_RATIO = 2.5
# combined: the untransferred lead that counts as 1. The untransferred verdict's own 0.2 (session 16) let the
# lead's false positives decide (G); on all 293 models of (D)-(G) cuts of 0.3-0.4 (at the ratio's 2.5) all
# score ROC-AUC 0.911-0.912 (0.2: 0.906) with fewer false positives (FPR 0.09 vs 0.13 at 0.5); 0.35 is the
# middle of that plateau (benchmarks/README.md, session 17)
COMBINED_LEAD = 0.35
# combined: v's factor between a check on the class named that agrees and one that does not. On the 366 usable
# models of (D)-(H) the two tests name the same class in 83% of the backdoored models and 34% of the clean
# ones, and smooth images favour the class named in 50% against 12%; factors 1.25-2.5 all score ROC-AUC
# 0.917-0.922 (1: 0.901), with 0.5 still the cut of the largest TPR - FPR (benchmarks/README.md, session 18)
COMBINED_AGREEMENT = 1.5
COMBINED_THRESHOLD = 0.5    # the suspicion v / (v + 1) at v = 1: one of the two at its cut
MAD_CONSISTENCY = 1.4826    # the median absolute deviation times this estimates a normal's standard deviation
MARGIN_FLOOR = 1e-6      # margins at or below 0 (a class no start reached) count as this share of the largest


@dataclass(frozen=True)
class MarginConfig:
    """How :func:`fmt_audit.verdict.margin.max_margins` searches for each class's largest margin."""

    restarts: int = 16      # random starting images per class
    steps: int = 200        # Adam steps per start
    lr: float = 0.05        # Adam step size on the sigmoid's argument
    seed: int = 0
    batch: int = 256        # images optimised in one forward pass (each start is independent of the others)

    def __post_init__(self):
        if self.restarts < 1:
            raise ConfigError(f"--margin-restarts must be at least 1; got {self.restarts}")
        if self.steps < 1:
            raise ConfigError(f"--margin-steps must be at least 1; got {self.steps}")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"the margin test's learning rate must be positive; got {self.lr}")
        if self.batch < 1:
            raise ConfigError(f"the margin test's batch must be at least 1; got {self.batch}")


@dataclass(frozen=True)
class UniversalConfig:
    """How :func:`fmt_audit.verdict.evidence.universal.universal_ladder` climbs its budget ladder."""

    first: float = 0.01         # the first rung's budget: RMS pixel change in [0, 1] pixel space
    factor: float = 2 ** 0.5    # each rung's budget over the last one's
    rungs: int = 11             # at most; the default ladder ends at 0.32
    steps: int = 20             # projected gradient steps per rung
    images: int = 32            # images per class the perturbation is fitted on
    level: float = 0.9          # held-out success of the leading class that ends the ladder
    seed: int = 0
    batch: int = 512            # images in one forward pass

    def __post_init__(self):
        if not (np.isfinite(self.first) and self.first > 0):
            raise ConfigError(f"the universal test's first budget must be positive; got {self.first}")
        if not (np.isfinite(self.factor) and self.factor > 1):
            raise ConfigError(f"the universal test's budget factor must be above 1; got {self.factor}")
        for name in ("rungs", "steps", "images", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"the universal test's {name} must be at least 1; got {getattr(self, name)}")
        if not 0 < self.level <= 1:
            raise ConfigError(f"the universal test's level must be in (0, 1]; got {self.level}")


@dataclass(frozen=True)
class CleanseConfig:
    """How :func:`fmt_audit.verdict.evidence.cleanse.reverse_triggers` searches each class's smallest mask-and-pattern trigger
    (Neural Cleanse's optimisation, its defaults where they carry over)."""

    steps: int = 300        # Adam steps; every class is optimised at once
    lr: float = 0.1         # Adam step size on the masks' and patterns' sigmoid arguments
    images: int = 32        # images of other classes each class's trigger is fitted on
    level: float = 0.99     # success on those images a mask must reach to count (Neural Cleanse's 99%)
    cost: float = 1e-3      # the L1 weight once a class first reaches the level, per pixel of the mask
    patience: int = 10      # steps between adjustments of the weight (x1.5 when at the level, / 1.5^1.5 when not)
    seed: int = 0
    batch: int = 512        # images in one forward pass

    def __post_init__(self):
        for name in ("steps", "images", "patience", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"the trigger search's {name} must be at least 1; got {getattr(self, name)}")
        for name in ("lr", "cost"):
            if not (np.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"the trigger search's {name} must be positive; got {getattr(self, name)}")
        if not 0 < self.level <= 1:
            raise ConfigError(f"the trigger search's level must be in (0, 1]; got {self.level}")


@dataclass(frozen=True)
class ReferenceConfig:
    """How :func:`fmt_audit.verdict.evidence.reference.train_reference` trains the transfer test's reference networks."""

    count: int = 3          # references, trained from seeds seed, seed + 1, ...
    steps: int = 400        # optimiser steps each, whatever the number of images
    batch: int = 64
    lr: float = 3e-3
    crop: int = 2           # random-crop padding in pixels

    def __post_init__(self):
        for name in ("count", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"the reference networks' {name} must be at least 1; got {getattr(self, name)}")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"the reference networks' learning rate must be positive; got {self.lr}")
        if self.crop < 0:
            raise ConfigError(f"the reference networks' crop padding must be 0 or more; got {self.crop}")


@dataclass(frozen=True)
class Verdict:
    method: str                 # one of METHODS but "none"
    suspicion: float | None     # in [0, 1]; None without evidence
    verdict: str                # "clean" | "suspicious" | "inconclusive"
    target_class: int | None    # the class the evidence points to: the likely attack target
    threshold: float
    basis: str                  # what the evidence was, in words
    details: dict = field(default_factory=dict)     # the method's own figures (see to_dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "suspicion": self.suspicion, "verdict": self.verdict,
                "target_class": self.target_class, "threshold": self.threshold, "basis": self.basis,
                **self.details}


def describe(verdict: dict) -> str:
    """One line for a scan's summary, from a verdict as reports store it (:meth:`Verdict.to_dict`)."""
    if verdict.get("suspicion") is None:
        return f"verdict: inconclusive ({verdict['basis']})"
    if verdict["method"] in ("margin", "transfer"):
        ordered = sorted(verdict["margins"], reverse=True)
        evidence = (f"class {verdict['target_class']} reaches margin {ordered[0]:.3g}, the next class "
                    f"{ordered[1]:.3g}; p = {verdict['p_value']:.2g}")
        if verdict["method"] == "transfer":
            evidence += (f"; its universal perturbation moves {verdict['transferred'][verdict['target_class']]:.0%} "
                         f"of held-out images into it in {len(verdict['reference_success'])} reference networks "
                         "trained on the scan's images")
    elif verdict["method"] == "shortcut":
        top = verdict["target_class"]
        ordered = sorted(verdict["untransferred_margin"], reverse=True)
        evidence = (f"class {top}'s perturbation (RMS {verdict['budgets'][-1]:.3g}) gives held-out images a median "
                    f"margin of {verdict['held_out_margin'][top]:.3g}, {ordered[0]:.3g} beyond what it adds in "
                    f"{len(verdict['reference_margin'])} reference networks trained on the scan's images; the next "
                    f"class {ordered[1]:.3g}")
    elif verdict["method"] == "untransferred":
        evidence = _untransferred_evidence(verdict, verdict["target_class"])
    elif verdict["method"] == "cleanse":
        index = verdict["anomaly_index"]
        evidence = (f"{_trigger_evidence(verdict, verdict['target_class'])}: anomaly index "
                    f"{'infinite' if index is None else format(index, '.3g')}")
    elif verdict["method"] == "combined":
        parts = []
        if "norms" in verdict:
            ratio = verdict["mask_ratio"]
            parts.append(f"{_trigger_evidence(verdict, verdict['cleanse_class'])}, "
                         f"{'infinitely' if ratio is None else format(ratio, '.3g') + ' times'} smaller (counts "
                         f"from {COMBINED_RATIO:g})")
        if "untransferred" in verdict:
            parts.append(f"{_untransferred_evidence(verdict, verdict['untransferred_class'])} (counts from "
                         f"{verdict.get('lead_cut', COMBINED_LEAD):.0%})")
        if "agreement_factor" in verdict:
            parts.append(_checks_evidence(verdict))
        evidence = "; ".join(parts)
    elif verdict["method"] == "universal":
        ordered = sorted(verdict["success"][-1], reverse=True)
        evidence = (f"one perturbation of RMS {verdict['budgets'][-1]:.3g} sends {ordered[0]:.0%} of held-out images "
                    f"to class {verdict['target_class']}, the next class's {ordered[1]:.0%}")
    else:
        evidence = f"{verdict['suspicion']:.0%} of the disturbed predictions went to class {verdict['target_class']}"
    return (f"verdict: {verdict['verdict']} (suspicion {verdict['suspicion']:.2f}, threshold {verdict['threshold']}: "
            f"{evidence}; {verdict['basis']})")


def _untransferred_evidence(verdict: dict, top: int) -> str:
    ordered = sorted(verdict["untransferred"], reverse=True)
    return (f"class {top}'s perturbation (RMS {verdict['budgets'][-1]:.3g}) sends {verdict['success'][-1][top]:.0%} "
            f"of held-out images to it, {ordered[0]:.0%} beyond what it moves there in "
            f"{len(verdict['reference_success'])} reference networks trained on the scan's images; the next class "
            f"{ordered[1]:.0%}")


def _checks_evidence(verdict: dict) -> str:
    checks = []
    if "tests_agree" in verdict:
        checks.append(f"the two tests name {'the same class' if verdict['tests_agree'] else 'different classes'}")
    if "smooth_class" in verdict:
        share = verdict["smooth_shares"][verdict["smooth_class"]]
        checks.append(f"smooth random images favour class {verdict['smooth_class']} ({share:.0%} of them)")
    return f"{' and '.join(checks)}: x{verdict['agreement_factor']:.3g}"


def _trigger_evidence(verdict: dict, top: int) -> str:
    evidence = (f"class {top}'s smallest reversed trigger covers {verdict['norms'][top]:.1%} of the pixels, the "
                f"median class's {float(np.median(verdict['norms'])):.1%}")
    if "trigger_success" in verdict:
        evidence += f" (it sends {verdict['trigger_success'][top]:.0%} of held-out images there)"
    return evidence


THRESHOLDS = {"margin": MARGIN_THRESHOLD, "sink": SINK_THRESHOLD, "universal": UNIVERSAL_THRESHOLD,
              "transfer": TRANSFER_THRESHOLD, "shortcut": SHORTCUT_THRESHOLD,
              "untransferred": UNTRANSFERRED_THRESHOLD, "cleanse": CLEANSE_THRESHOLD,
              "combined": COMBINED_THRESHOLD}


def inconclusive(method: str, why: str) -> Verdict:
    return Verdict(method, None, "inconclusive", None, THRESHOLDS[method], why)


def universal_verdict(budgets: Sequence[float], success: Sequence[Sequence[float]],
                      basis: str = "universal-perturbation test") -> Verdict:
    """The verdict from a universal-perturbation ladder (:func:`fmt_audit.verdict.evidence.universal.universal_ladder`): the
    lead of the best-reached class over the next one at the last rung climbed (the first where a class
    reached the ladder's level, or its top)."""
    details = _ladder_details(budgets, success)
    last = _last_rung(success)
    if last is None:
        return inconclusive("universal", f"{basis}: needs the held-out success of at least 3 classes")
    top, lead = _lead(last)
    return Verdict("universal", lead, "suspicious" if lead >= UNIVERSAL_THRESHOLD else "clean", top,
                   UNIVERSAL_THRESHOLD, basis, details)


def _last_rung(success: Sequence[Sequence[float]]) -> np.ndarray | None:
    """The ladder's last rung of held-out shares, or None when it has fewer than 3 classes or a non-finite one."""
    last = np.asarray(success[-1], dtype=float) if len(success) else np.zeros(0)
    return last if len(last) >= 3 and np.isfinite(last).all() else None


def _lead(shares: np.ndarray) -> tuple[int, float]:
    """The class with the largest share, and its lead over the next."""
    top = int(shares.argmax())
    return top, round(float(shares[top] - np.sort(shares)[-2]), 6)


def _ladder_details(budgets: Sequence[float], success: Sequence[Sequence[float]]) -> dict:
    """A universal ladder's figures as verdicts report them, checked for one budget per rung."""
    if len(budgets) != len(success):
        raise ValueError(f"one budget per rung: {len(budgets)} budgets, {len(success)} rungs of success")
    return {"budgets": [float(b) for b in budgets], "success": [[float(v) for v in row] for row in success]}


def transferred(reference_success: Sequence[Sequence[float]], reference_baseline: Sequence[Sequence[float]],
                classes: int) -> np.ndarray:
    """Per class, the share of held-out images its universal perturbation moves into it in the references
    beyond those already there: mean over references of success minus baseline, clipped to [0, 1] (a
    perturbation that pulls the references away is no evidence either way); NaN where a figure is not finite,
    so that an infinite one is not clipped into a share."""
    gain = _reference_gain(reference_success, reference_baseline, classes)
    return np.where(np.isfinite(gain), np.clip(gain, 0.0, 1.0), np.nan)


def _reference_gain(moved: Sequence[Sequence[float]], before: Sequence[Sequence[float]], classes: int) -> np.ndarray:
    """Per class, the mean over references of a figure with the perturbations minus without them, checked for
    one row of ``classes`` values per reference in both."""
    moved, before = np.asarray(moved, dtype=float), np.asarray(before, dtype=float)
    if moved.ndim != 2 or moved.shape != before.shape or moved.shape[1] != classes or not len(moved):
        raise ValueError(f"one row of {classes} classes per reference, with and without the perturbations; got "
                         f"shapes {list(moved.shape)} and {list(before.shape)}")
    return moved.mean(0) - before.mean(0)


def transfer_verdict(margins: Sequence[float], budgets: Sequence[float], success: Sequence[Sequence[float]],
                     reference_success: Sequence[Sequence[float]], reference_baseline: Sequence[Sequence[float]],
                     basis: str = "transfer test", figures: dict | None = None) -> Verdict:
    """The maximum-margin verdict (:func:`margin_verdict` on ``margins``) discounted by how natural its class
    is: ``(1 - p) * (1 - t)``, where ``t`` is the share of held-out images the class's universal perturbation
    (the last rung of ``budgets``/``success``, as :func:`universal_verdict` takes them) moves into the class
    in clean reference networks (:func:`transferred`; ``reference_success`` and ``reference_baseline`` per
    reference and class, with and without the perturbations). ``figures``: more of the same test's figures to
    report with it (the margins :func:`shortcut_verdict` reads)."""
    ladder = _ladder_details(budgets, success)
    margin = margin_verdict(margins, basis)
    if margin.suspicion is None:
        return inconclusive("transfer", margin.basis)
    natural = transferred(reference_success, reference_baseline, len(margins))
    if not np.isfinite(natural).all():
        return inconclusive("transfer", f"{basis}: the references' shares are not finite")
    top = margin.target_class
    suspicion = round(margin.suspicion * (1.0 - float(natural[top])), 6)
    return Verdict("transfer", suspicion, "suspicious" if suspicion >= TRANSFER_THRESHOLD else "clean", top,
                   TRANSFER_THRESHOLD, basis, margin.details | {
                       "transferred": [round(float(v), 6) for v in natural], **ladder,
                       "reference_success": [[float(v) for v in row] for row in reference_success],
                       "reference_baseline": [[float(v) for v in row] for row in reference_baseline],
                       **(figures or {})})


def untransferred_verdict(budgets: Sequence[float], success: Sequence[Sequence[float]],
                          reference_success: Sequence[Sequence[float]], reference_baseline: Sequence[Sequence[float]],
                          basis: str = "untransferred universal-perturbation test") -> Verdict:
    """The verdict from the universal ladder's last rung (``budgets``/``success`` as :func:`universal_verdict`
    takes them) and its transfer to references (per reference and class, their held-out shares with the
    perturbations and without, as :func:`transfer_verdict` takes them): the lead of the largest untransferred
    share, ``success - t`` clipped to [0, 1], over the next."""
    ladder = _ladder_details(budgets, success)
    last = _last_rung(success)
    if last is None:
        return inconclusive("untransferred", f"{basis}: needs the held-out success of at least 3 classes")
    natural = transferred(reference_success, reference_baseline, len(last))
    if not np.isfinite(natural).all():
        return inconclusive("untransferred", f"{basis}: the references' shares are not finite")
    beyond = np.clip(last - natural, 0.0, 1.0)
    top, lead = _lead(beyond)
    return Verdict("untransferred", lead, "suspicious" if lead >= UNTRANSFERRED_THRESHOLD else "clean", top,
                   UNTRANSFERRED_THRESHOLD, basis, {
                       **ladder, "transferred": [round(float(v), 6) for v in natural],
                       "untransferred": [round(float(v), 6) for v in beyond],
                       "reference_success": [[float(v) for v in row] for row in reference_success],
                       "reference_baseline": [[float(v) for v in row] for row in reference_baseline]})


def untransferred_margins(held_out_margin: Sequence[float], reference_margin: Sequence[Sequence[float]],
                          reference_margin_baseline: Sequence[Sequence[float]]) -> np.ndarray:
    """Per class, the median margin its perturbation gives the audited model's held-out images
    (``held_out_margin``) less the margin it adds in the references: the mean over references of their median
    margin with the perturbation (``reference_margin``, per reference and class) minus without it
    (``reference_margin_baseline``). Not clipped: a perturbation that pulls clean networks away from its class
    while it pushes the model there is the model's own shortcut all the more."""
    model = np.asarray(held_out_margin, dtype=float)
    if model.ndim != 1:
        raise ValueError(f"one held-out margin per class; got shape {list(model.shape)}")
    return model - _reference_gain(reference_margin, reference_margin_baseline, len(model))


def shortcut_verdict(budgets: Sequence[float], success: Sequence[Sequence[float]], held_out_margin: Sequence[float],
                     reference_margin: Sequence[Sequence[float]], reference_margin_baseline: Sequence[Sequence[float]],
                     basis: str = "shortcut test") -> Verdict:
    """The verdict from the universal ladder's last rung (``budgets``/``success`` as :func:`universal_verdict`
    takes them; ``held_out_margin``, per class, the median margin of its held-out images in the audited model)
    and its transfer to references (per reference and class, their median margins with the perturbations and
    without): the gap of the largest :func:`untransferred_margins` to the next, over its distance to their
    median."""
    ladder = _ladder_details(budgets, success)
    values = np.asarray(held_out_margin, dtype=float)
    if len(values) < 3 or not np.isfinite(values).all():
        return inconclusive("shortcut", f"{basis}: needs finite margins of at least 3 classes")
    beyond = untransferred_margins(values, reference_margin, reference_margin_baseline)
    if not np.isfinite(beyond).all():
        return inconclusive("shortcut", f"{basis}: the references' margins are not finite")
    top = int(beyond.argmax())
    ordered = np.sort(beyond)[::-1]
    spread = float(ordered[0] - np.median(beyond))
    gap = round(float((ordered[0] - ordered[1]) / spread), 6) if spread > 0 else 0.0
    return Verdict("shortcut", gap, "suspicious" if gap >= SHORTCUT_THRESHOLD else "clean", top, SHORTCUT_THRESHOLD,
                   basis, {**ladder, "held_out_margin": [round(float(v), 6) for v in values],
                           "reference_margin": [[float(v) for v in row] for row in reference_margin],
                           "reference_margin_baseline": [[float(v) for v in row] for row in reference_margin_baseline],
                           "untransferred_margin": [round(float(v), 6) for v in beyond]})


def anomaly_index(norms: Sequence[float]) -> tuple[int, float]:
    """Neural Cleanse's outlier test: the class with the smallest norm, and how far below the median it
    stands in robust standard deviations (the median absolute deviation times :data:`MAD_CONSISTENCY`);
    infinite where the others all equal the median and it does not."""
    values = np.asarray(norms, dtype=float)
    top = int(values.argmin())
    median = float(np.median(values))
    spread = MAD_CONSISTENCY * float(np.median(np.abs(values - median)))
    below = median - float(values[top])
    if spread <= 1e-12 * max(median, 1e-12):
        return top, float("inf") if below > 1e-12 * max(median, 1e-12) else 0.0
    return top, below / spread


def cleanse_verdict(norms: Sequence[float], success: Sequence[float] | None = None,
                    reached: Sequence[bool] | None = None, basis: str = "trigger search") -> Verdict:
    """The verdict from each class's smallest reversed trigger (:func:`fmt_audit.verdict.evidence.cleanse.reverse_triggers`:
    ``norms``, its mask's L1 norm as a share of the pixels; ``success``, its held-out success; ``reached``,
    whether the search reached its level): Neural Cleanse's anomaly index ``a`` of the smallest, as the
    suspicion ``a / (a + 2)``, ``suspicious`` from ``a = 2`` (0.5), Neural Cleanse's threshold."""
    values = np.asarray(norms, dtype=float)
    if values.ndim != 1 or len(values) < 3 or not np.isfinite(values).all():
        return inconclusive("cleanse", f"{basis}: needs finite trigger norms of at least 3 classes")
    for name, given in (("trigger_success", success), ("reached", reached)):
        if given is not None and len(given) != len(values):
            raise ValueError(f"one {name} figure per class: {len(given)} for {len(values)} classes")
    figures = {"norms": [round(float(v), 6) for v in values]}
    if success is not None:
        figures["trigger_success"] = [round(float(v), 6) for v in success]
    if reached is not None:
        figures["reached"] = [bool(v) for v in reached]
    if reached is not None and not any(reached):
        return inconclusive("cleanse", f"{basis}: no class's trigger reached the search's level")
    top, index = anomaly_index(values)
    suspicion = 1.0 if np.isinf(index) else round(index / (index + CLEANSE_INDEX), 6)     # 0.5 at the index cut
    return Verdict("cleanse", suspicion, "suspicious" if suspicion >= CLEANSE_THRESHOLD else "clean", top,
                   CLEANSE_THRESHOLD, basis, {"anomaly_index": round(index, 6) if np.isfinite(index) else None,
                                               **figures})


def mask_ratio(norms: Sequence[float]) -> tuple[int, float]:
    """The class with the smallest reversed trigger, and how many times smaller its mask is than the median
    class's (1: no smaller; infinite for an empty mask under a non-empty median)."""
    values = np.asarray(norms, dtype=float)
    top = int(values.argmin())
    median = float(np.median(values))
    if values[top] <= 0:
        return top, float("inf") if median > 0 else 1.0
    return top, max(median / float(values[top]), 1.0)


def combined_verdict(cleanse: Verdict, untransferred: Verdict, lead_cut: float = COMBINED_LEAD,
                     smooth: Sequence[float] | None = None, agreement: float = COMBINED_AGREEMENT) -> Verdict:
    """The ``combined`` verdict from a model's ``cleanse`` and ``untransferred`` verdicts (their figures in
    their details) and, optionally, the share of smooth random images each class takes (``smooth``,
    :func:`fmt_audit.verdict.evidence.smooth.smooth_test`): the larger of the mask ratio's log over :data:`COMBINED_RATIO`'s and
    the untransferred lead over ``lead_cut``, ``v``, naming the class of the larger; then each check on that
    class (the two tests name the same class; the class smooth images favour is it) multiplies ``v`` by
    ``sqrt(agreement)`` when it agrees and divides it when it does not. The suspicion is ``v / (v + 1)``.
    Where one of the two tests is inconclusive the other decides alone, and the basis says so.
    ``agreement=1`` (no checks) with ``lead_cut=0.35`` is session 17's rule, with ``0.2`` session 16's."""
    if not (np.isfinite(lead_cut) and lead_cut > 0):
        raise ConfigError(f"the combined verdict's lead cut must be positive; got {lead_cut}")
    if not (np.isfinite(agreement) and agreement >= 1):
        raise ConfigError(f"the combined verdict's agreement factor must be at least 1; got {agreement}")
    over, bases, named = [], [], {}
    figures = {k: v for verdict in (untransferred, cleanse) for k, v in verdict.details.items()}
    if cleanse.suspicion is not None:
        top, ratio = mask_ratio(cleanse.details["norms"])
        over.append((np.log(ratio) / np.log(COMBINED_RATIO), top))
        bases.append(cleanse.basis)
        named["cleanse"] = top
        figures |= {"mask_ratio": round(ratio, 6) if np.isfinite(ratio) else None, "cleanse_class": top}
    else:
        bases.append(f"no trigger search ({cleanse.basis})")
    if untransferred.suspicion is not None:
        over.append((untransferred.suspicion / lead_cut, untransferred.target_class))
        bases.append(untransferred.basis)
        named["untransferred"] = untransferred.target_class
        figures |= {"lead": untransferred.suspicion, "lead_cut": lead_cut,
                    "untransferred_class": untransferred.target_class}
    else:
        bases.append(f"no untransferred test ({untransferred.basis})")
    basis = "; ".join(bases)
    if not over:
        return inconclusive("combined", basis)
    value, top = max(over, key=lambda pair: pair[0])
    checks = {}
    if len(named) == 2:
        checks["tests_agree"] = named["cleanse"] == named["untransferred"]
    if smooth is not None:
        shares = np.asarray(smooth, dtype=float)
        if shares.ndim != 1 or len(shares) <= top or not np.isfinite(shares).all():
            raise ValueError(f"one finite smooth-image share per class, at least {top + 1}; got {list(shares)}")
        figures |= {"smooth_shares": [round(float(v), 6) for v in shares], "smooth_class": int(shares.argmax())}
        checks["smooth_agrees"] = int(shares.argmax()) == top
    if checks:
        factor = agreement ** (0.5 * sum(1 if agrees else -1 for agrees in checks.values()))
        value *= factor
        figures |= {**checks, "agreement": agreement, "agreement_factor": round(float(factor), 6)}
    suspicion = 1.0 if np.isinf(value) else round(float(value / (value + 1)), 6)
    return Verdict("combined", suspicion, "suspicious" if suspicion >= COMBINED_THRESHOLD else "clean", top,
                   COMBINED_THRESHOLD, basis, figures)


def margin_verdict(margins: Sequence[float], basis: str = "maximum-margin test") -> Verdict:
    """The verdict from each class's maximum margin (:func:`fmt_audit.verdict.margin.max_margins`)."""
    from scipy import stats

    values = np.asarray(margins, dtype=float)
    if len(values) < 3 or not np.isfinite(values).all():
        return inconclusive("margin", f"{basis}: needs finite margins of at least 3 classes")
    top = int(values.argmax())
    largest = float(values[top])
    if largest <= 0:    # no class could be pushed above the others: nothing stands out
        return inconclusive("margin", f"{basis}: no class reached a positive margin")
    floored = np.maximum(values, MARGIN_FLOOR * largest)
    rest = np.delete(floored, top)
    if np.ptp(rest) <= 1e-12 * largest:     # a Gamma cannot be fitted to equal values
        p_value = 0.0 if largest > rest[0] * (1 + 1e-9) else 1.0
    else:
        shape, _, scale = stats.gamma.fit(rest, floc=0)
        # 1 - (1 - sf)^n without the rounding of 1 - cdf^n, so that tiny p-values stay apart
        tail = float(stats.gamma.sf(largest, shape, loc=0, scale=scale))
        p_value = float(-np.expm1(len(rest) * np.log1p(-tail))) if tail < 1 else 1.0
    p_value = min(max(p_value, 0.0), 1.0)
    suspicion = round(1.0 - p_value, 6)
    return Verdict("margin", suspicion, "suspicious" if suspicion >= MARGIN_THRESHOLD else "clean", top,
                   MARGIN_THRESHOLD, basis,
                   {"p_value": float(f"{p_value:.6g}"), "margins": [round(float(v), 4) for v in values]})


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
    details = {"counted": counted, "tested": tested, "min_shift": MIN_SHIFT}
    if counted < MIN_PAIRS:
        return Verdict("sink", None, "inconclusive", None, SINK_THRESHOLD,
                       f"only {counted} of {tested} disturbed candidate batches moved predictions; try a larger --eps",
                       details)
    sink_class = max(sorted(weight), key=weight.__getitem__)
    suspicion = round(weight[sink_class] / sum(weight.values()), 6)
    return Verdict("sink", suspicion, "suspicious" if suspicion >= SINK_THRESHOLD else "clean", sink_class,
                   SINK_THRESHOLD, basis, details)
