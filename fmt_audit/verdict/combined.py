"""``combined`` (the default): three families of evidence, each over its own cut, checked on the class they name.

* The trigger search's **mask ratio** (:mod:`fmt_audit.verdict.evidence.cleanse`, Neural Cleanse's
  optimisation): how many times smaller the smallest class's reversed mask is than the median class's; a
  ratio of :data:`RATIO_CUT` counts as 1, on a log scale. The ratio, not Neural Cleanse's MAD-scaled anomaly
  index: a clean model whose classes need near-equal masks has a tiny spread that inflates the index of a
  merely ordinary smallest class.
* The **untransferred lead** (:mod:`fmt_audit.verdict.evidence.universal`, :mod:`~.evidence.transfer`): per
  class, the share of held-out images of the other classes that one faint universal perturbation sends there,
  less the share it moves there in small clean networks trained on the same images; the largest share's lead
  over the next, :data:`LEAD_CUT` counting as 1. A natural attractor, which clean networks share, loses its
  lead; a backdoor's target keeps it.
* The **warp lead** (:mod:`fmt_audit.verdict.evidence.warp`): per class, the share of held-out images of the
  other classes that one smooth flow field of at most half a pixel per component (then one pixel) warps
  there; at the budget where it is largest, the leading share's lead over the next, :data:`WARP_CUT` counting
  as 1. A warping trigger (WaNet) is neither a patch nor an additive perturbation, and both tests above miss
  it; a clean network is hardly moved by so small a warp, and where it is, to several classes.

The larger of the first two, ``v``, names the class. Two checks on that class: do the two tests name the same
class, and is it the class smooth random images fall into most (:mod:`fmt_audit.verdict.evidence.smooth`)?
Each check that agrees multiplies ``v`` by ``sqrt(AGREEMENT)``, each that does not divides it; a check
without its evidence is left out. The suspicion is ``v / (v + 1)``, ``suspicious`` from 0.5. Where one test
has no evidence the other decides alone, and the basis says so. Where the warp lead over its cut is larger
than ``v`` after the checks (or neither test has evidence), it decides, and names its class; the checks are
not applied to it (docs/research/verdict-warp.md).

Fixed before the held-out tests (docs/research/verdict.md): ROC-AUC 0.908 on 114 models it was not developed
on (FPR 0.09, TPR 0.70 at 0.5), before the warp search joined. Needs labelled data; costs a trigger search, a
universal ladder, three small reference networks, a warp search and 1024 forward passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fmt_audit.errors import ConfigError, FmtAuditError
from fmt_audit.verdict.base import ClassFigure, Verdict, VerdictInputs, VerdictMethod
from fmt_audit.verdict.config import ReferenceConfig, VerdictConfig

RATIO_CUT = 2.5     # the median class's mask this many times the smallest's counts as 1
LEAD_CUT = 0.35     # the untransferred lead that counts as 1
AGREEMENT = 1.5     # v's factor between a check on the class named that agrees and one that does not
WARP_CUT = 0.35     # the warp lead that counts as 1


@dataclass(frozen=True)
class TriggerFigures:
    """The trigger search's figures per class: its smallest mask's L1 norm as a share of the pixels, the
    held-out share the trigger sends to the class, whether the search reached its level."""

    norms: Sequence[float]
    success: Sequence[float] | None = None
    reached: Sequence[bool] | None = None
    basis: str = "trigger search"


@dataclass(frozen=True)
class TransferFigures:
    """The universal ladder's budgets and per-rung, per-class held-out success, and, per reference network
    and class, the held-out share with the ladder's last perturbations and without them."""

    budgets: Sequence[float]
    success: Sequence[Sequence[float]]
    reference_success: Sequence[Sequence[float]]
    reference_baseline: Sequence[Sequence[float]]
    basis: str = "untransferred universal-perturbation test"


@dataclass(frozen=True)
class WarpFigures:
    """The warp search's budgets (pixels) and, per budget, every class's held-out success."""

    budgets: Sequence[float]
    success: Sequence[Sequence[float]]
    basis: str = "warp search"


class CombinedMethod(VerdictMethod):
    name = "combined"
    threshold = 0.5     # v / (v + 1) at v = 1: one of the tests at its cut
    needs_data = True
    summary = ("a trigger search and a universal perturbation's lead beyond what transfers to clean reference "
               "networks, checked on the class they name, and a smooth-warp search; the best result on held-out "
               "models")

    def gather(self, inputs: VerdictInputs, config: VerdictConfig) -> Verdict:
        if inputs.dataset is None:
            raise ConfigError("the combined verdict needs labelled images (--data)")
        from fmt_audit.backends.torch.logits import logit_classifier
        from fmt_audit.verdict.evidence.cleanse import reverse_triggers
        from fmt_audit.verdict.evidence.smooth import smooth_shares
        from fmt_audit.verdict.evidence.transfer import transfer_to_references
        from fmt_audit.verdict.evidence.universal import universal_ladder
        from fmt_audit.verdict.evidence.warp import warp_search

        loaded, dataset = inputs.loaded, inputs.dataset
        image = loaded.image_input
        classifier, classes, notes = logit_classifier(loaded.classifier, image, inputs.preprocessing, inputs.device,
                                                      inputs.bridge, "combined verdict")
        triggers: TriggerFigures | str
        transfer: TransferFigures | str
        tell = inputs.progress or (lambda stage, done, total: None)
        search = config.cleanse()
        try:
            found = reverse_triggers(classifier, dataset, classes, search,
                                     lambda done, total: tell("trigger search", done, total))
            triggers = TriggerFigures(found.norms, found.success, found.reached, "; ".join(
                [f"trigger search, {search.steps} steps, {found.images} images per class to fit, at least "
                 f"{found.held_out} held out", *notes]))
        except FmtAuditError as error:
            triggers = str(error)
        universal, references = config.universal(), ReferenceConfig()
        try:
            tell("universal ladder", 0, 0)
            ladder = universal_ladder(classifier, dataset, classes, universal,
                                      lambda budget, best: tell(f"universal ladder (the rung at budget {budget:.3g} "
                                                                f"done: its best class takes {best:.0%} of held-out "
                                                                "images)", 0, 0))
            tell("reference networks", 0, 0)
            moved = transfer_to_references(ladder, dataset, classes, "cpu", references, universal.seed,
                                           universal.batch, cache=inputs.references)
            transfer = TransferFigures(ladder.budgets, ladder.success, moved.reference_success,
                                       moved.reference_baseline, "; ".join(
                [f"the transfer of the universal-perturbation test, {ladder.images} images per class to fit, at "
                 f"least {ladder.held_out} held out, to {references.count} reference networks trained on the "
                 "verdict's images", *notes]))
        except FmtAuditError as error:
            transfer = str(error)
        warp: WarpFigures | str
        search_warp = config.warp()
        try:
            found_warp = warp_search(classifier, dataset, classes, search_warp,
                                     lambda done, total: tell("warp search", done, total))
            warp = WarpFigures(found_warp.budgets, found_warp.success, "; ".join(
                [f"warp search, {search_warp.steps} steps per budget, {found_warp.images} images per class to fit, "
                 f"at least {found_warp.held_out} held out", *notes]))
        except FmtAuditError as error:
            warp = str(error)
        tell("smooth images", 0, 0)
        shares = smooth_shares(classifier, (image.channels, image.height, image.width), classes)
        return combined_verdict(triggers, transfer, [round(float(s), 6) for s in shares], warp)

    def evidence(self, verdict: dict) -> str:
        parts = []
        if "norms" in verdict:
            ratio = verdict["mask_ratio"]
            parts.append(f"{_trigger_evidence(verdict, verdict['cleanse_class'])}, "
                         f"{'infinitely' if ratio is None else format(ratio, '.3g') + ' times'} smaller (counts "
                         f"from {RATIO_CUT:g})")
        if "untransferred" in verdict:
            top = verdict["untransferred_class"]
            ordered = sorted(verdict["untransferred"], reverse=True)
            parts.append(f"class {top}'s perturbation (RMS {verdict['budgets'][-1]:.3g}) sends "
                         f"{verdict['success'][-1][top]:.0%} of held-out images to it, {ordered[0]:.0%} beyond what "
                         f"it moves there in {len(verdict['reference_success'])} reference networks trained on the "
                         f"verdict's images; the next class {ordered[1]:.0%} (counts from {LEAD_CUT:.0%})")
        if "warp_lead" in verdict:
            top = verdict["warp_class"]
            rung, _, _ = warp_lead(verdict["warp_success"])
            row = verdict["warp_success"][rung]
            parts.append(f"class {top}'s smooth warp (each component at most {verdict['warp_budgets'][rung]:g} pixel, "
                         f"the budget with the largest lead) sends {row[top]:.0%} of held-out images of other classes "
                         f"to it, the next class {sorted(row)[-2]:.0%}: a lead of {100 * verdict['warp_lead']:.0f} "
                         f"points (counts from {100 * WARP_CUT:.0f})"
                         + (", and decides" if verdict.get("decided_by") == "warp" else ""))
        if "agreement_factor" in verdict:
            checks = []
            if "tests_agree" in verdict:
                named = "the same class" if verdict["tests_agree"] else "different classes"
                checks.append(f"the two tests name {named}")
            if "smooth_class" in verdict:
                share = verdict["smooth_shares"][verdict["smooth_class"]]
                checks.append(f"smooth random images favour class {verdict['smooth_class']} ({share:.0%} of them)")
            parts.append(f"{' and '.join(checks)}: x{verdict['agreement_factor']:.3g}"
                         + (" (on the other tests' class, which the warp outweighs)"
                            if verdict.get("decided_by") == "warp" else ""))
        return "; ".join(parts)

    def figures(self, verdict: dict) -> list[ClassFigure]:
        shown = []
        if verdict.get("norms"):
            shown.append(ClassFigure(
                "Trigger search", "For each class, the smallest mask-and-pattern trigger found that sends the other "
                "classes' images there, as the share of the image's pixels it covers. A backdoor's target needs a "
                "far smaller one than the other classes.", verdict["norms"], "mask's share of the pixels"))
        if verdict.get("untransferred"):
            shown.append(ClassFigure(
                "Untransferred test", "For each class, the share of held-out images its universal perturbation "
                f"sends there in the model, less the share it moves there in {len(verdict['reference_success'])} "
                "small clean networks trained on the same images. A backdoor's target keeps its lead; a natural "
                "attractor loses it.", verdict["untransferred"], "held-out share beyond the references'"))
        if verdict.get("warp_success"):
            rung, _, _ = warp_lead(verdict["warp_success"])
            shown.append(ClassFigure(
                "Warp search", "For each class, the share of held-out images of the other classes that one smooth "
                f"flow field (each component at most {verdict['warp_budgets'][rung]:g} pixel: the budget where the "
                "leading class is furthest ahead) warps there. A warping trigger's target takes nearly all of them; "
                "a clean model is hardly moved by so small a warp.", verdict["warp_success"][rung],
                "held-out share warped there"))
        if verdict.get("smooth_shares"):
            shown.append(ClassFigure(
                "Smooth-input test", "For each class, the share of smooth random images (coarse noise upsampled, "
                "flat grey levels) the model puts there. A poisoned model often sends them to its target; the "
                "verdict checks the class it names against the favoured one.", verdict["smooth_shares"],
                "share of smooth images"))
        return shown


COMBINED = CombinedMethod()


def mask_ratio(norms: Sequence[float]) -> tuple[int, float]:
    """The class with the smallest reversed trigger, and how many times smaller its mask is than the median
    class's (1: no smaller; infinite for an empty mask under a non-empty median)."""
    values = np.asarray(norms, dtype=float)
    top = int(values.argmin())
    median = float(np.median(values))
    if values[top] <= 0:
        return top, float("inf") if median > 0 else 1.0
    return top, max(median / float(values[top]), 1.0)


def transferred(reference_success: Sequence[Sequence[float]], reference_baseline: Sequence[Sequence[float]],
                classes: int) -> np.ndarray:
    """Per class, the share of held-out images its universal perturbation moves into it in the references
    beyond those already there: mean over references of success minus baseline, clipped to [0, 1] (a
    perturbation that pulls the references away is no evidence either way); NaN where a figure is not finite,
    so that an infinite one is not clipped into a share."""
    moved, before = np.asarray(reference_success, dtype=float), np.asarray(reference_baseline, dtype=float)
    if moved.ndim != 2 or moved.shape != before.shape or moved.shape[1] != classes or not len(moved):
        raise ValueError(f"one row of {classes} classes per reference, with and without the perturbations; got "
                         f"shapes {list(moved.shape)} and {list(before.shape)}")
    gain = moved.mean(0) - before.mean(0)
    return np.where(np.isfinite(gain), np.clip(gain, 0.0, 1.0), np.nan)


def _trigger_part(triggers: TriggerFigures) -> tuple[dict, str | None]:
    """The trigger search's figures as reports carry them, and why they are no evidence (None: they are)."""
    values = np.asarray(triggers.norms, dtype=float)
    if values.ndim != 1 or len(values) < 3 or not np.isfinite(values).all():
        return {}, "needs finite trigger norms of at least 3 classes"
    for name, given in (("trigger_success", triggers.success), ("reached", triggers.reached)):
        if given is not None and len(given) != len(values):
            raise ValueError(f"one {name} figure per class: {len(given)} for {len(values)} classes")
    figures: dict = {"norms": [round(float(v), 6) for v in values]}
    if triggers.success is not None:
        figures["trigger_success"] = [round(float(v), 6) for v in triggers.success]
    if triggers.reached is not None:
        figures["reached"] = [bool(v) for v in triggers.reached]
        if not any(triggers.reached):
            return figures, "no class's trigger reached the search's level"
    return figures, None


def _transfer_part(transfer: TransferFigures) -> tuple[dict, str | None, int, float]:
    """The untransferred test's figures as reports carry them, why they are no evidence (None: they are), and
    the class with the largest untransferred share with its lead over the next."""
    if len(transfer.budgets) != len(transfer.success):
        raise ValueError(f"one budget per rung: {len(transfer.budgets)} budgets, {len(transfer.success)} rungs")
    figures: dict = {"budgets": [float(b) for b in transfer.budgets],
                     "success": [[float(v) for v in row] for row in transfer.success]}
    last = np.asarray(transfer.success[-1], dtype=float) if len(transfer.success) else np.zeros(0)
    if len(last) < 3 or not np.isfinite(last).all():
        return figures, "needs the held-out success of at least 3 classes", -1, 0.0
    natural = transferred(transfer.reference_success, transfer.reference_baseline, len(last))
    if not np.isfinite(natural).all():
        return figures, "the references' shares are not finite", -1, 0.0
    beyond = np.clip(last - natural, 0.0, 1.0)
    top = int(beyond.argmax())
    lead = round(float(beyond[top] - np.sort(beyond)[-2]), 6)
    figures |= {"transferred": [round(float(v), 6) for v in natural],
                "untransferred": [round(float(v), 6) for v in beyond],
                "reference_success": [[float(v) for v in row] for row in transfer.reference_success],
                "reference_baseline": [[float(v) for v in row] for row in transfer.reference_baseline]}
    return figures, None, top, lead


def _warp_part(warp: WarpFigures) -> tuple[dict, str | None, int, float]:
    """The warp search's figures as reports carry them, why they are no evidence (None: they are), and the
    class with the largest lead over the next at any budget, with that lead."""
    if len(warp.budgets) != len(warp.success) or not len(warp.budgets):
        raise ValueError(f"one row of success per budget: {len(warp.budgets)} budgets, {len(warp.success)} rows")
    success = np.asarray(warp.success, dtype=float)
    figures: dict = {"warp_budgets": [float(b) for b in warp.budgets],
                     "warp_success": [[round(float(v), 6) for v in row] for row in success]}
    if success.ndim != 2 or success.shape[1] < 3 or not np.isfinite(success).all():
        return figures, "needs the held-out success of at least 3 classes", -1, 0.0
    _, top, lead = warp_lead(success)
    return figures, None, top, lead


def warp_lead(success: Sequence[Sequence[float]]) -> tuple[int, int, float]:
    """Of the warp search's ``[budget][class]`` held-out success: the budget where the leading class's lead over
    the next is largest, that class, and its lead."""
    values = np.asarray(success, dtype=float)
    ordered = np.sort(values, axis=1)
    leads = ordered[:, -1] - ordered[:, -2]
    rung = int(leads.argmax())
    return rung, int(values[rung].argmax()), round(float(leads[rung]), 6)


def combined_verdict(triggers: TriggerFigures | str, transfer: TransferFigures | str,
                     smooth: Sequence[float] | None = None, warp: WarpFigures | str | None = None) -> Verdict:
    """The ``combined`` verdict from the trigger search's figures and the untransferred test's (each: or a
    reason there are none), optionally the share of smooth random images each class takes, and optionally
    the warp search's figures (or a reason there are none)."""
    over, bases, named, figures = [], [], {}, {}
    if isinstance(transfer, TransferFigures):
        part, why, top, lead = _transfer_part(transfer)
        if why is None:
            figures |= part
            over.append((lead / LEAD_CUT, top))
            bases.append(transfer.basis)
            named["untransferred"] = top
            figures |= {"lead": lead, "untransferred_class": top}
        else:
            bases.append(f"no untransferred test ({transfer.basis}: {why})")
    else:
        bases.append(f"no untransferred test ({transfer})")
    if isinstance(triggers, TriggerFigures):
        part, why = _trigger_part(triggers)
        if why is None:
            figures |= part
            top, ratio = mask_ratio(triggers.norms)
            over.insert(0, (np.log(ratio) / np.log(RATIO_CUT), top))
            bases.insert(0, triggers.basis)
            named["cleanse"] = top
            figures |= {"mask_ratio": round(ratio, 6) if np.isfinite(ratio) else None, "cleanse_class": top}
        else:
            bases.insert(0, f"no trigger search ({triggers.basis}: {why})")
    else:
        bases.insert(0, f"no trigger search ({triggers})")
    warped = None       # the warp lead over its cut, and its class
    if isinstance(warp, WarpFigures):
        part, why, warp_top, lead_of_warp = _warp_part(warp)
        if why is None:
            warped = (lead_of_warp / WARP_CUT, warp_top)
            bases.append(warp.basis)
            figures |= part | {"warp_lead": lead_of_warp, "warp_class": warp_top}
        else:
            bases.append(f"no warp search ({warp.basis}: {why})")
    elif warp is not None:
        bases.append(f"no warp search ({warp})")
    basis = "; ".join(bases)
    if not over and warped is None:
        return COMBINED.inconclusive(basis)
    value, top = max(over, key=lambda pair: pair[0]) if over else (0.0, -1)   # none: the warp decides alone
    checks = {}
    if len(named) == 2:
        checks["tests_agree"] = named["cleanse"] == named["untransferred"]
    if smooth is not None:
        shares = np.asarray(smooth, dtype=float)
        if shares.ndim != 1 or len(shares) <= top or not np.isfinite(shares).all():
            raise ValueError(f"one finite smooth-image share per class, at least {top + 1}; got {list(shares)}")
        figures |= {"smooth_shares": [round(float(v), 6) for v in shares], "smooth_class": int(shares.argmax())}
        if over:
            checks["smooth_agrees"] = int(shares.argmax()) == top
    if checks:
        factor = AGREEMENT ** (0.5 * sum(1 if agrees else -1 for agrees in checks.values()))
        value *= factor
        figures |= {**checks, "agreement_factor": round(float(factor), 6)}
    if warped is not None and (not over or warped[0] > value):
        value, top = warped
        figures["decided_by"] = "warp"
    suspicion = 1.0 if np.isinf(value) else round(float(value / (value + 1)), 6)
    return COMBINED.decided(suspicion, top, basis, figures)


def _trigger_evidence(verdict: dict, top: int) -> str:
    evidence = (f"class {top}'s smallest reversed trigger covers {verdict['norms'][top]:.1%} of the pixels, the "
                f"median class's {float(np.median(verdict['norms'])):.1%}")
    if "trigger_success" in verdict:
        evidence += f" (it sends {verdict['trigger_success'][top]:.0%} of held-out images there)"
    return evidence
