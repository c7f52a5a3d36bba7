"""What every repair method is: a name, whether it needs data and fine-tunes, how it chooses the channels to
remove, and what its report records.

A method is one file holding a :class:`RepairMethod`; the registry (:mod:`fmt_audit.repair.methods.registry`)
lists them. :func:`fmt_audit.repair.pipeline.repair` runs the steps every method shares (removal, fine-tuning,
write-back, verification, the self-check) and asks the method for what differs; `compare`, the CLI and fleet
manifests ask the registry which methods exist. A method file imports no torch: its algorithm
(:mod:`fmt_audit.fmt.scan`, :mod:`fmt_audit.repair.pruning`, :mod:`~fmt_audit.repair.anp`,
:mod:`~fmt_audit.repair.ibau`) is imported when it runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fmt_audit.model.graph import ChannelSet

if TYPE_CHECKING:
    import torch

    from fmt_audit.backends.torch.bridge import BridgedClassifier
    from fmt_audit.data import Dataset
    from fmt_audit.fmt.scan import ScanConfig
    from fmt_audit.model.loading import LoadedModel
    from fmt_audit.repair.config import RepairConfig
    from fmt_audit.report.json_report import ScanReport
    from fmt_audit.verdict.config import VerdictConfig
    from fmt_audit.verdict.evidence.transfer import ReferenceCache


@dataclass(frozen=True)
class RepairInputs:
    """What a method may choose its channels (and run its own step) with: the settings, the model, the repair's
    training split, the model in torch, and what the caller gave or a scan may reuse."""

    config: RepairConfig
    scan_config: ScanConfig
    loaded: LoadedModel
    train: Dataset
    classifier: BridgedClassifier
    flagged: ScanReport | ChannelSet | None = None       # the caller's channels (methods that take them)
    progress: Callable[[str, int, int], None] | None = None
    check: VerdictConfig | None = None                  # the self-check's verdict (a scan's trace follows it)
    references: ReferenceCache | None = None


@dataclass(frozen=True)
class Removal:
    """The channels a method removes, where they came from (in words, the report's ``flagged.source``), the
    scan that chose them (if one ran here), the evidence the method chose them on (for the report) and the
    reversed triggers it found on the way (``--selection trace``)."""

    source: str
    channels: ChannelSet
    scan: ScanReport | None = None
    evidence: dict | None = None
    # the trace's reversed triggers ((mask, pattern) tensors), which the unlearning stamps into half its copies
    stamps: tuple[tuple[torch.Tensor, torch.Tensor], ...] = field(default=(), repr=False, compare=False)


class RepairMethod(ABC):
    """A repair method. Subclasses set the class attributes and implement :meth:`removal`; the other methods
    have the defaults of a method that removes channels and fine-tunes."""

    name: str
    summary: str                    # one line: what it does (CLI help, README)
    needs_data: bool = True         # False: runs without clean data (then it cannot fine-tune)
    fine_tunes: bool = True         # False: its own step is the whole repair
    without_fine_tuning: str = ""   # why it ends without fine-tuning, for the text summary
    takes_channels: bool = False    # accepts the channels to remove from the caller (a scan report)
    compared: bool = True           # in `compare` when the methods are not named
    escalates: bool = False         # the self-check may retry it stronger (repair.selfcheck: *ESCALATION)

    @abstractmethod
    def removal(self, inputs: RepairInputs) -> Removal:
        """The channels to remove (none is an answer)."""

    def unlearns(self, config: RepairConfig, scan_config: ScanConfig) -> bool:
        """Whether fine-tuning also unlearns feature-map perturbations."""
        return False

    def after_removal(self, inputs: RepairInputs) -> dict | None:
        """A step of the method's own after the removal (i-BAU's unlearning), in place on
        ``inputs.classifier``; its evidence, or None where the method has none."""
        return None

    def settings(self, config: RepairConfig) -> dict:
        """The method's own settings, for the report's ``config``."""
        return {}
