"""Trace selection: the channel set that carries the suspect class's reversed trigger, cut round by round.

The per-channel test disturbs one channel at a time, so it cannot see a backdoor that many channels carry
together, each standing in for the others: removing any one changes nothing. Here the verdict's evidence
leads. Neural Cleanse's search (:mod:`fmt_audit.verdict.evidence.cleanse`) finds a small stamp that sends
the defender's images of other classes into the class the verdict names. Each Conv channel's response to
the stamp — the shift of its spatial mean, stamped against clean, in the channel's clean standard
deviations, on held-out images — ranks the channels, and the smallest top set whose removal stops the stamp
(it then sends at most ``stop`` of the held-out images into the class) is cut. The search then runs again on
the cut model: where channels stood in for each other, the next stamp goes through those left. Rounds end
when the class's smallest stamp is no longer anomalously small (its mask covers at least the other classes'
median over the verdict's ``RATIO_CUT``), when no stamp reaches the search's level, or at the limits.

A warping trigger (WaNet) has no small stamp. Where the verdict's warp search decided, the rounds follow the
class's smooth warp instead (:func:`trace_warp`): the same ranking, cut and search again, with the flow field
refitted on the cut model, until it no longer leads the other classes' best warp by the verdict's cut.

Development and figures: docs/research/set-selection.md, docs/research/trace-warp.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from fmt_audit.backends.torch.bridge import BridgedClassifier, channels_held_at_zero
from fmt_audit.data import Dataset
from fmt_audit.errors import ConfigError
from fmt_audit.model.graph import ChannelSet, ConvLayer
from fmt_audit.verdict.config import CleanseConfig, WarpConfig
from fmt_audit.verdict.evidence.cleanse import search_class, stamped

if TYPE_CHECKING:
    from fmt_audit.verdict.base import Verdict
    from fmt_audit.verdict.config import VerdictConfig


@dataclass(frozen=True)
class TraceConfig:
    rounds: int = 8             # searches at most
    max_share: float = 0.1      # of all Conv channels, cut at most
    stop: float = 0.2           # a round's cut is enough when its stamp sends at most this share into the class
    held_out: int = 500         # images of other classes the responses and the stamp's success are measured on
    growth: float = 1.25        # the top set grows by this factor (at least one channel) until the stamp stops
    ratio_cut: float = 2.5      # the stamp is anomalous while the others' median mask is this many times larger
    seed: int = 0
    search: CleanseConfig = field(default_factory=CleanseConfig)
    warp: WarpConfig = field(default_factory=WarpConfig)    # where the verdict's warp search decided


@dataclass(frozen=True)
class Trace:
    target: int
    flagged: dict[str, list[int]]
    rounds: list[dict]          # per round: the stamp's mask share, its success before and after the cut, the cut
    stop: str                   # why the rounds ended
    # the class's anomalous reversed triggers, one (mask [1, H, W], pattern [C, H, W]) per round that found one
    stamps: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False, compare=False)
    by: str = "stamp"           # the trigger traced: the reversed stamp, or the smooth warp (``warp``)

    @property
    def count(self) -> int:
        return sum(len(c) for c in self.flagged.values())

    def to_dict(self) -> dict:
        return {"target": self.target, "flagged": self.count, "trigger": self.by, "rounds": self.rounds,
                "stop": self.stop}


def channel_means(classifier: BridgedClassifier, layers: Sequence[ConvLayer], x: np.ndarray,
                  batch: int = 256) -> dict[str, np.ndarray]:
    """``{layer: [N, C]}``: each Conv channel's spatial mean, where the channel leaves for the rest of the network
    (the module its mask sits after), with whatever hooks are in place."""
    modules = {layer.name: classifier.bridge.channel_modules.get(layer.name, classifier.bridge.conv_modules[layer.name])
               for layer in layers}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in modules}
    current: dict[str, torch.Tensor] = {}

    def keeping(name: str) -> Callable:
        def hook(_module, _inputs, output):
            current[name] = output.detach().flatten(2).mean(2)
        return hook

    handles = [module.register_forward_hook(keeping(name)) for name, module in modules.items()]
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch):
                classifier(torch.from_numpy(np.ascontiguousarray(x[start:start + batch])).to(classifier.device))
                for name in modules:
                    parts[name].append(current[name].float().cpu().numpy())
    finally:
        for handle in handles:
            handle.remove()
    return {name: np.concatenate(values) for name, values in parts.items()}


def _top(scores: Mapping[str, np.ndarray], k: int) -> dict[str, list[int]]:
    """The ``k`` highest-scoring channels over all layers (ties: layer order, then channel)."""
    order = sorted((-float(v), i, c) for i, values in enumerate(scores.values()) for c, v in enumerate(values))
    names = list(scores)
    out: dict[str, list[int]] = {}
    for _, i, c in order[:k]:
        out.setdefault(names[i], []).append(c)
    return out


def _union(a: ChannelSet, b: ChannelSet) -> dict[str, list[int]]:
    return {name: sorted(set(a.get(name, ())) | set(b.get(name, ()))) for name in {**a, **b}}


@dataclass(frozen=True)
class _Found:
    """What one round's search found: the trigger's figures for the report and, where it is anomalous, how to
    apply it to images (None: the rounds end, ``why``)."""

    figures: dict
    apply: Callable[[np.ndarray], np.ndarray] | None = None
    why: str = ""


def _rounds(classifier: BridgedClassifier, layers: Sequence[ConvLayer], target: int, x_held: np.ndarray,
            find: Callable[[int], _Found], config: TraceConfig) -> tuple[dict[str, list[int]], list[dict], str]:
    """The rounds of a trace: ``find(round)`` searches the trigger on the model with the channels cut so far held
    at zero; its channels are ranked by their response to it on ``x_held`` (images of other classes) and the
    smallest top set that stops it is cut. The channels, the rounds' figures and why they ended."""
    total = sum(layer.out_channels for layer in layers)
    limit = int(config.max_share * total)
    modules = classifier.bridge.channel_modules
    removed: dict[str, list[int]] = {}
    rounds: list[dict] = []

    def success(images: np.ndarray, cut: ChannelSet) -> float:
        with channels_held_at_zero(modules, cut):
            return _reaching(classifier, images, target)

    stop = f"{config.rounds} rounds"
    for number in range(config.rounds):
        with channels_held_at_zero(modules, removed):
            found = find(number)
        if found.apply is None:
            stop = found.why
            if found.figures:
                rounds.append({"round": number, **found.figures})
            break
        x_triggered = found.apply(x_held)
        with channels_held_at_zero(modules, removed):
            clean = channel_means(classifier, layers, x_held)
            triggered = channel_means(classifier, layers, x_triggered)
        scores = {name: (triggered[name].mean(0) - clean[name].mean(0)) / (clean[name].std(0) + 1e-6)
                  for name in clean}
        for name, channels in removed.items():
            scores[name][list(channels)] = -np.inf
        before = success(x_triggered, removed)
        room = limit - sum(len(c) for c in removed.values())
        size, cut, after = 1, dict(removed), before
        while size <= room:
            cut = _union(removed, _top(scores, size))
            after = success(x_triggered, cut)
            if after <= config.stop:
                break
            size = max(size + 1, round(size * config.growth))
        added = sum(len(c) for c in cut.values()) - sum(len(c) for c in removed.values())
        removed = {name: channels for name, channels in cut.items() if channels}
        rounds.append({"round": number, **found.figures, "success_before": round(before, 4), "added": added,
                       "success_after": round(after, 4)})
        if after > config.stop:
            stop = f"the limit of {config.max_share:.0%} of the channels"
            break
    return removed, rounds, stop


def _reaching(classifier: BridgedClassifier, images: np.ndarray, target: int) -> float:
    """The share of ``images`` ``classifier`` assigns to ``target``."""
    with torch.inference_mode():
        predicted = [classifier(torch.from_numpy(images[s:s + 256]).to(classifier.device)).argmax(1)
                     for s in range(0, len(images), 256)]
    return float((torch.cat(predicted) == target).float().mean())


def _split(dataset: Dataset, target: int, config: TraceConfig) -> tuple[np.ndarray, np.ndarray]:
    """Images of other classes than ``target``: indices to fit each round's trigger on, and held-out ones."""
    others = np.random.default_rng(config.seed).permutation(np.flatnonzero(dataset.y != target))
    return others[:config.search.images], others[config.search.images:config.search.images + config.held_out]


def trace_channels(classifier: BridgedClassifier, layers: Sequence[ConvLayer], dataset: Dataset, target: int,
                   median_norm: float, config: TraceConfig = TraceConfig()) -> Trace:
    """The channels that carry ``target``'s reversed trigger in ``classifier`` (frozen, eval mode), found on
    ``dataset`` (clean, labelled); ``median_norm``: the median mask share of the other classes' reversed
    triggers (the ``combined`` verdict's ``norms``)."""
    fit, held = _split(dataset, target, config)
    x_all = torch.from_numpy(np.ascontiguousarray(dataset.x)).to(classifier.device)
    stamps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def find(number: int) -> _Found:
        mask, pattern = search_class(classifier, x_all, fit, target, config.search, seed=config.seed + number)
        if mask is None:
            return _Found({}, why="no reversed trigger reached the search's level")
        share = float(mask.mean())
        if share >= median_norm / config.ratio_cut:
            return _Found({"mask_share": round(share, 6)}, why=(
                f"the class's reversed trigger covers {share:.2%} of the pixels, no longer anomalous "
                f"(the other classes' median {median_norm:.2%})"))
        stamps.append((mask.detach().cpu(), pattern.detach().cpu()))
        return _Found({"mask_share": round(share, 6)}, lambda x, stamp=stamps[-1]: stamped(
            torch.from_numpy(x), *stamp).numpy())

    removed, rounds, stop = _rounds(classifier, layers, target, np.ascontiguousarray(dataset.x[held]), find, config)
    return Trace(target, removed, rounds, stop, stamps)


def trace_warp(classifier: BridgedClassifier, layers: Sequence[ConvLayer], dataset: Dataset, target: int,
               budget: float, rival: float, config: TraceConfig = TraceConfig()) -> Trace:
    """The channels that carry ``target``'s smooth warp trigger in ``classifier`` (frozen, eval mode), found on
    ``dataset`` (clean, labelled): each round fits the class's flow field of at most ``budget`` pixels a
    component (:func:`~fmt_audit.verdict.evidence.warp.fit_field`) on the model cut so far; it is anomalous
    while it warps a share of the held-out images there that leads ``rival`` (the other classes' best share
    at that budget, from the verdict's warp search) by the verdict's cut."""
    from fmt_audit.verdict.combined import WARP_CUT
    from fmt_audit.verdict.evidence.warp import fit_field

    fit, held = _split(dataset, target, config)
    x_all = torch.from_numpy(np.ascontiguousarray(dataset.x)).to(classifier.device)
    x_held = np.ascontiguousarray(dataset.x[held])

    def find(number: int) -> _Found:
        warp, displacement = fit_field(classifier, x_all, fit, target, budget, config.warp, seed=config.seed + number)

        def apply(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return warp.apply(torch.from_numpy(x).to(x_all.device), displacement).cpu().numpy()

        reached = _reaching(classifier, apply(x_held), target)
        figures = {"warp_success": round(reached, 4)}
        if reached - rival < WARP_CUT:
            return _Found(figures, why=(f"the class's warp of at most {budget:g} pixel sends {reached:.0%} of the "
                                        f"held-out images there, no longer {WARP_CUT:.0%} ahead of the other "
                                        f"classes' best ({rival:.0%})"))
        return _Found(figures, apply)

    removed, rounds, stop = _rounds(classifier, layers, target, x_held, find, config)
    return Trace(target, removed, rounds, stop, by="warp")


def require_combined(verdict: VerdictConfig | None) -> None:
    """Trace follows the ``combined`` verdict's reversed triggers; refuse any other verdict (or none)."""
    if verdict is None or verdict.method != "combined":
        raise ConfigError("--selection trace follows the combined verdict's reversed trigger: give --verdict combined")


def untraceable(verdict: Verdict | None) -> str | None:
    """Why ``verdict`` (a :class:`~fmt_audit.verdict.Verdict` or None) names no class to trace; None when it
    does: a suspicious verdict with reversed-trigger figures (the ``combined`` method's ``norms``), or one its
    warp search decided."""
    if verdict is None or verdict.verdict != "suspicious":
        return "the verdict is not suspicious"
    if verdict.details.get("decided_by") != "warp" and not verdict.details.get("norms"):
        return "the verdict names no class with reversed-trigger figures"
    return None


def trace_verdict(classifier: BridgedClassifier, layers: Sequence[ConvLayer], dataset: Dataset,
                  verdict: Verdict | None, seed: int = 0, with_stamps: bool = False) -> dict:
    """What reports keep of the trace of ``verdict``'s class (its reversed trigger's channels in ``layers``,
    found on ``dataset``), with the channels under ``layers``; ``{"skipped": why}`` where it names none.
    ``with_stamps``: its reversed triggers too, under ``stamps`` (tensors: take them out before writing a report).
    ``classifier`` is frozen here: give it a conversion of its own, not one that is fine-tuned after."""
    from fmt_audit.backends.torch.logits import freeze

    why = untraceable(verdict)
    if why is not None:
        return {"skipped": why}
    target = int(verdict.target_class)
    freeze(classifier)
    if verdict.details.get("decided_by") == "warp":
        # the class's warp decided: trace it at the budget where it led, against the other classes' best there
        from fmt_audit.verdict.combined import warp_lead

        rung, _, _ = warp_lead(verdict.details["warp_success"])
        rival = max(v for k, v in enumerate(verdict.details["warp_success"][rung]) if k != target)
        traced = trace_warp(classifier, layers, dataset, target, verdict.details["warp_budgets"][rung], rival,
                            TraceConfig(seed=seed))
    else:
        norms = np.asarray(verdict.details["norms"], dtype=float)
        traced = trace_channels(classifier, layers, dataset, target, float(np.median(np.delete(norms, target))),
                                TraceConfig(seed=seed))
    return {**traced.to_dict(), "layers": traced.flagged, **({"stamps": traced.stamps} if with_stamps else {})}
