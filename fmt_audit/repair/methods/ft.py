"""``ft``: fine-tuning alone on the clean data, nothing removed: the baseline every defense is measured against."""

from __future__ import annotations

from fmt_audit.repair.methods.base import Removal, RepairInputs, RepairMethod


class FineTuning(RepairMethod):
    name = "ft"
    summary = "fine-tuning alone"

    def removal(self, inputs: RepairInputs) -> Removal:
        return Removal("none (fine-tuning alone)", {})


FT = FineTuning()
