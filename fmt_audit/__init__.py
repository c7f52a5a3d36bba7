"""fmt-audit: find and remove neural backdoors in ONNX image classifiers with Feature Map Testing.

The public API is imported lazily, so ``import fmt_audit`` costs nothing until a
name is used, and torch is imported only by the stages that need it (the
PyTorch bridge and what builds on it).
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "loading", "LoadedModel": "loading",
    "conv_layers": "graph", "node_names": "graph", "ConvLayer": "graph", "ImageInput": "graph",
    "instrument": "instrument", "mask_input_name": "instrument", "feature_output_name": "instrument",
    "create_session": "runtime", "Session": "runtime",
    "to_torch": "bridge", "write_back": "bridge", "TorchBridge": "bridge",
    "load_data": "data", "Dataset": "data", "Preprocessing": "data",
    "summarize": "inspection", "ModelSummary": "inspection",
    "ScanConfig": "scan", "ScanReport": "report", "MaskedModel": "masked",
    "trigger_response": "oracle",
    "margin_test": "margin", "margin_verdict": "verdict", "MarginConfig": "verdict", "Verdict": "verdict",
    "universal_test": "universal", "universal_verdict": "verdict", "UniversalConfig": "verdict",
    "transfer_test": "transfer", "transfer_verdict": "verdict", "ReferenceConfig": "verdict",
    "shortcut_verdict": "verdict",
    "untransferred_verdict": "verdict",
    "cleanse_test": "cleanse", "cleanse_verdict": "verdict", "CleanseConfig": "verdict",
    "combined_verdict": "verdict", "mask_ratio": "verdict", "smooth_test": "smooth", "smooth_images": "smooth",
    "train_reference": "reference",
    "RepairConfig": "repair", "RepairResult": "repair", "FineTuneConfig": "finetune", "RepairReport": "report",
    "evaluate": "evaluation", "Evaluation": "evaluation", "Metrics": "evaluation",
    "FmtAuditError": "errors", "ModelLoadError": "errors", "UnsupportedModelError": "errors",
    "DataError": "errors", "DeviceError": "errors", "BridgeError": "errors", "RepairError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'fmt_audit' has no attribute {name!r}")
