"""fmt-audit: find and remove neural backdoors in ONNX image classifiers with Feature Map Testing.

The public API is imported lazily, so ``import fmt_audit`` costs nothing until a
name is used, and torch is imported only by the stages that need it (the
PyTorch bridge and what builds on it).
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "model.loading", "LoadedModel": "model.loading",
    "conv_layers": "model.graph", "node_names": "model.graph", "ConvLayer": "model.graph", "ImageInput": "model.graph",
    "instrument": "backends.onnxrt.instrument", "mask_input_name": "backends.onnxrt.instrument", "feature_output_name": "backends.onnxrt.instrument",
    "create_session": "backends.onnxrt.session", "Session": "backends.onnxrt.session",
    "to_torch": "backends.torch.bridge", "write_back": "backends.torch.bridge", "TorchBridge": "backends.torch.bridge",
    "load_data": "data", "Dataset": "data", "Preprocessing": "data",
    "summarize": "model.inspection", "ModelSummary": "model.inspection",
    "ScanConfig": "fmt.scan", "ScanReport": "report.json_report", "MaskedModel": "backends.onnxrt.masked",
    "margin_test": "verdict.margin", "margin_verdict": "verdict", "MarginConfig": "verdict", "Verdict": "verdict",
    "universal_test": "verdict.evidence.universal", "universal_verdict": "verdict", "UniversalConfig": "verdict",
    "transfer_test": "verdict.evidence.transfer", "transfer_verdict": "verdict", "ReferenceConfig": "verdict",
    "shortcut_verdict": "verdict",
    "untransferred_verdict": "verdict",
    "cleanse_test": "verdict.evidence.cleanse", "cleanse_verdict": "verdict", "CleanseConfig": "verdict",
    "combined_verdict": "verdict", "mask_ratio": "verdict", "smooth_test": "verdict.evidence.smooth", "smooth_images": "verdict.evidence.smooth",
    "train_reference": "verdict.evidence.reference",
    "RepairConfig": "repair.pipeline", "RepairResult": "repair.pipeline", "FineTuneConfig": "repair.finetune", "RepairReport": "report.json_report",
    "evaluate": "repair.evaluation", "Evaluation": "repair.evaluation", "Metrics": "repair.evaluation",
    "FmtAuditError": "errors", "ModelLoadError": "errors", "UnsupportedModelError": "errors",
    "DataError": "errors", "DeviceError": "errors", "BridgeError": "errors", "RepairError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'fmt_audit' has no attribute {name!r}")
