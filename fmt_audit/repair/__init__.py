"""Removing a backdoor: removal, fine-tuning with unlearning, other defenses, evaluation; ``repair``."""

from fmt_audit.repair.pipeline import RepairConfig, RepairResult, repair

__all__ = ["RepairConfig", "RepairResult", "repair"]
