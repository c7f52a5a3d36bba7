"""Exceptions that cross the library boundary.

Every error a user can cause (a bad file, an option out of range, a model the
tool cannot handle) is a :class:`FmtAuditError`. The CLI turns these into a
one-line message and exit code 2; anything else is a bug (exit code 3).
"""

from __future__ import annotations


class FmtAuditError(Exception):
    """Base class: the input or the request is wrong, not the tool."""


class ModelLoadError(FmtAuditError):
    """The file is missing, is not ONNX, or fails validation."""


class UnsupportedModelError(FmtAuditError):
    """A valid ONNX model that this tool cannot audit (no Conv, several inputs, ...)."""


class DataError(FmtAuditError):
    """A data file or folder is missing, malformed, or does not fit the model."""


class DeviceError(FmtAuditError):
    """The requested execution device is not usable on this machine."""


class BridgeError(FmtAuditError):
    """The ONNX graph cannot be converted to PyTorch (or written back)."""


class ConfigError(FmtAuditError):
    """An option is out of range or options contradict each other."""


class OutputError(FmtAuditError):
    """An output cannot be written where asked (missing folder, would overwrite an input)."""


class RepairError(FmtAuditError):
    """The repaired model failed verification (checker, ONNX Runtime, torch parity, removed channels)."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message, else its type's name: messages quoting other tools
    (protobuf, ONNX Runtime, onnx2torch) can run over many lines, or be empty."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
