"""Removing a backdoor: removal, fine-tuning with unlearning, other defenses, evaluation; :func:`repair`.

``repair``, ``RepairConfig`` and ``RepairResult`` are imported lazily: importing this package (for
``repair.config`` or ``repair.evaluation``, say) imports no torch.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {"repair": "pipeline", "RepairResult": "pipeline", "RepairConfig": "config", "repair_config": "config",
            "FineTuneConfig": "config"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'fmt_audit.repair' has no attribute {name!r}")
