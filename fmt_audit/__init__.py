"""fmt-audit: find and remove neural backdoors in ONNX image classifiers with Feature Map Testing.

The pipeline, one subpackage a stage (ARCHITECTURE.md): ``model`` (load, validate, inspect) →
``backends`` (ONNX Runtime, PyTorch) → ``fmt`` (test every Conv channel, select: :func:`scan`) →
``verdict`` (is the model backdoored: :func:`assess`) → ``repair`` (remove, fine-tune, write back:
:func:`fmt_audit.repair.repair`) → ``report`` (JSON, text, HTML); ``fleet`` runs many models.

The public API is imported lazily, so ``import fmt_audit`` costs nothing until a name is used, and torch is
imported only by the stages that need it.
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.2.0"

_EXPORTS = {
    "load_model": "model.loading", "LoadedModel": "model.loading", "summarize": "model.inspection",
    "load_data": "data", "Dataset": "data", "Preprocessing": "data",
    "instrument": "backends.onnxrt.instrument", "create_session": "backends.onnxrt.session",
    "to_torch": "backends.torch.bridge", "write_back": "backends.torch.bridge",
    "scan": "fmt.scan", "ScanConfig": "fmt.scan", "ScanReport": "report.json_report",
    "assess": "verdict", "Verdict": "verdict", "VerdictConfig": "verdict",
    "ReferenceCache": "verdict.evidence.transfer",
    "RepairConfig": "repair.config", "RepairResult": "repair.pipeline", "FineTuneConfig": "repair.config",
    "RepairReport": "report.json_report", "evaluate": "repair.evaluation", "Evaluation": "repair.evaluation",
    "compare": "repair.comparison", "run_fleet": "fleet.audit", "read_source": "fleet.audit",
    "FmtAuditError": "errors", "ModelLoadError": "errors", "UnsupportedModelError": "errors",
    "DataError": "errors", "ConfigError": "errors", "DeviceError": "errors", "BridgeError": "errors",
    "RepairError": "errors", "OutputError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'fmt_audit' has no attribute {name!r}")
