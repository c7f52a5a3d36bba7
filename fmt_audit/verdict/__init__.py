"""Is this model backdoored? The model-level verdict: a suspicion in [0, 1], clean / suspicious /
inconclusive at the method's threshold, and the class the evidence points to (the likely attack target).

The methods (:data:`METHODS`; each one file, listed in :mod:`fmt_audit.verdict.registry`):

* ``combined`` (the default, :mod:`fmt_audit.verdict.combined`): a trigger search and a universal
  perturbation's lead beyond what transfers to clean reference networks, checked on the class they name.
  Needs labelled data. The best result on models it was not developed on (docs/research/verdict.md).
* ``margin`` (:mod:`fmt_audit.verdict.margin`): MM-BD's maximum-margin test. Data-free and fast; often
  fooled by natural attractor classes.

:func:`assess` computes a verdict on its own; :func:`fmt_audit.scan` computes one beside the channel scan.
Importing this package imports no torch.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from fmt_audit.errors import FmtAuditError
from fmt_audit.verdict.base import ClassFigure, Verdict, VerdictInputs, VerdictMethod
from fmt_audit.verdict.config import VerdictConfig
from fmt_audit.verdict.registry import CHOICES, DEFAULT, METHODS, NO_VERDICT

if TYPE_CHECKING:
    from fmt_audit.verdict.evidence.transfer import ReferenceCache

__all__ = ["CHOICES", "DEFAULT", "METHODS", "NO_VERDICT", "ClassFigure", "Verdict", "VerdictConfig",
           "VerdictInputs", "VerdictMethod", "assess", "describe", "figures", "gather"]
log = logging.getLogger(__name__)


def gather(inputs: VerdictInputs, config: VerdictConfig) -> Verdict:
    """``config.method``'s verdict from ``inputs`` (whose ``dataset`` is already the verdict's sample). When
    the evidence cannot be gathered (the PyTorch bridge cannot convert the model, no CUDA, too few images,
    ...), the verdict is inconclusive and says why."""
    method = METHODS[config.method]
    try:
        verdict = method.gather(inputs, config)
    except FmtAuditError as error:
        verdict = method.inconclusive(f"no {method.name} evidence: {error}")
    log.info("verdict %s: suspicion %s (%s)", verdict.verdict, verdict.suspicion, verdict.basis)
    return verdict


def assess(model: str | os.PathLike, data: str | os.PathLike | None = None, config: VerdictConfig | None = None,
           mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
           device: str = "auto", input_range: str = "0-1", *, references: ReferenceCache | None = None) -> Verdict:
    """The verdict on ``model`` (a path or a :class:`~fmt_audit.LoadedModel`) from the clean labelled images
    in ``data`` (``config.samples`` of them, drawn with ``config.seed``; a data-free method needs none), for
    a model that expects ``mean``/``std`` normalisation after its ``input_range`` (``0-1``, ``0-255``,
    ``-1-1``), on ``device`` (auto, cpu, cuda). ``references``: where reference networks trained on these
    images are kept and reused (:class:`fmt_audit.ReferenceCache`; with a folder, across processes)."""
    from fmt_audit.data import Preprocessing, load_data
    from fmt_audit.model.loading import LoadedModel, load_model

    config = config or VerdictConfig()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    preprocessing = Preprocessing(mean, std, input_range)
    preprocessing.check_channels(loaded.image_input.channels)
    dataset = None
    if data is not None:
        dataset = load_data(data, loaded.image_input, loaded.num_classes).take(config.samples, seed=config.seed)
        loaded = loaded.at_image_size(*dataset.x.shape[2:])
    return gather(VerdictInputs(loaded, dataset, preprocessing, device, references=references), config)


def describe(verdict: dict) -> str:
    """One line for a summary, from a verdict as reports store it (:meth:`Verdict.to_dict`)."""
    if verdict.get("suspicion") is None:
        return f"verdict: inconclusive ({verdict['basis']})"
    method = METHODS.get(verdict["method"])     # a report of an earlier version may name a retired one
    evidence = f"{method.evidence(verdict)}; " if method else ""
    return (f"verdict: {verdict['verdict']} (suspicion {verdict['suspicion']:.2f}, threshold {verdict['threshold']}: "
            f"{evidence}{verdict['basis']})")


def figures(verdict: dict) -> list[ClassFigure]:
    """The per-class figures of a verdict as reports store it, for the HTML report (none when inconclusive)."""
    if verdict.get("suspicion") is None or verdict.get("method") not in METHODS:
        return []
    return METHODS[verdict["method"]].figures(verdict)
