"""What every verdict method is: a name, a threshold, a way to gather its evidence and decide, and its words.

A method is one file (:mod:`fmt_audit.verdict.combined`, :mod:`fmt_audit.verdict.margin`) holding a
:class:`VerdictMethod` and the function that turns its figures into a :class:`Verdict`; the registry
(:mod:`fmt_audit.verdict.registry`) lists them. The scan, the text summary and the HTML report ask the
method of a verdict for what they need; none of them knows the methods by name. A method file imports no
torch: its evidence (:mod:`fmt_audit.verdict.evidence`) is imported when it is gathered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fmt_audit.backends.torch.bridge import TorchBridge
    from fmt_audit.data import Dataset, Preprocessing
    from fmt_audit.model.loading import LoadedModel
    from fmt_audit.verdict.config import VerdictConfig
    from fmt_audit.verdict.evidence.transfer import ReferenceCache

VERDICTS = ("clean", "suspicious", "inconclusive")


@dataclass(frozen=True)
class Verdict:
    method: str                 # a name of fmt_audit.verdict.METHODS
    suspicion: float | None     # in [0, 1]; None without evidence
    verdict: str                # one of VERDICTS
    target_class: int | None    # the class the evidence points to: the likely attack target
    threshold: float            # suspicion at or above this is "suspicious"
    basis: str                  # what the evidence was, in words
    details: dict = field(default_factory=dict)     # the method's own figures (report schema: docs/report-schema.md)

    def to_dict(self) -> dict:
        return {"method": self.method, "suspicion": self.suspicion, "verdict": self.verdict,
                "target_class": self.target_class, "threshold": self.threshold, "basis": self.basis,
                **self.details}


@dataclass(frozen=True)
class ClassFigure:
    """One per-class figure of a verdict's evidence, as the HTML report plots it (a bar per class, the class
    the verdict names marked)."""

    title: str
    note: str           # what the figure shows and what a backdoor does to it
    values: Sequence[float]
    label: str          # the axis: what a bar measures


@dataclass(frozen=True)
class VerdictInputs:
    """What a method may gather its evidence from: the model, labelled images (the verdict's own sample),
    the normalisation the model expects, the device, and what earlier stages already built (the model's
    torch conversion; trained reference networks to reuse)."""

    loaded: LoadedModel
    dataset: Dataset | None
    preprocessing: Preprocessing
    device: str = "auto"
    bridge: TorchBridge | None = None
    references: ReferenceCache | None = None
    # told of the method's stages, as a scan's progress (stage, done, total; total 0: a stage without a count)
    progress: Callable[[str, int, int], None] | None = None


class VerdictMethod(ABC):
    """A model-level verdict method. Subclasses set the class attributes and implement :meth:`gather` and
    :meth:`evidence`; :meth:`figures` is optional."""

    name: str
    threshold: float
    needs_data: bool
    summary: str        # one line: what it tests (CLI help, README)

    @abstractmethod
    def gather(self, inputs: VerdictInputs, config: VerdictConfig) -> Verdict:
        """Gather the evidence and decide. A :class:`~fmt_audit.errors.FmtAuditError` raised here (the bridge
        cannot convert the model, no CUDA, ...) becomes an inconclusive verdict that says why."""

    @abstractmethod
    def evidence(self, verdict: dict) -> str:
        """The evidence of a conclusive verdict, as reports store it (:meth:`Verdict.to_dict`), in words."""

    def figures(self, verdict: dict) -> list[ClassFigure]:
        """The per-class figures of a verdict as reports store it, for the HTML report."""
        return []

    def inconclusive(self, why: str) -> Verdict:
        return Verdict(self.name, None, "inconclusive", None, self.threshold, why)

    def decided(self, suspicion: float, target_class: int, basis: str, details: dict) -> Verdict:
        """The verdict of a suspicion: ``suspicious`` at or above the threshold."""
        return Verdict(self.name, suspicion, "suspicious" if suspicion >= self.threshold else "clean",
                       target_class, self.threshold, basis, details)
