"""``--device`` decided once: where ONNX Runtime and torch run, for every stage of one command.

``auto`` takes CUDA for a backend when that backend can use it: ONNX Runtime when its build offers the
CUDA provider, torch when it sees a GPU. The two can differ (the CPU build of ONNX Runtime beside a CUDA
torch), so the decision names both, and a report says where each stage really ran. ``cuda`` is refused at
once where torch has no GPU and the command needs torch; ONNX Runtime refuses it when a session cannot use
CUDA (:func:`fmt_audit.backends.onnxrt.session.create_session`). Neither framework is imported here unless
the decision needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fmt_audit.errors import DeviceError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Placement:
    """Where each backend runs: ``onnxruntime`` and ``torch`` are ``cpu`` or ``cuda``; ``torch`` is None
    when the command needs no torch (a mask-mode scan without a verdict)."""

    requested: str
    onnxruntime: str
    torch: str | None = None
    # the memory format torch's convolutions ran in (TorchBridge.memory_format_on); None: no torch module placed
    torch_memory_format: str | None = None

    def with_torch(self) -> Placement:
        """This placement with torch's device decided (imports torch)."""
        if self.torch is not None:
            return self
        from fmt_audit.backends.torch.bridge import torch_device

        return Placement(self.requested, self.onnxruntime, torch_device(self.requested))

    def memory_device(self, mode: str) -> str:
        """Where a scan in ``mode`` keeps its heavy arrays: ONNX Runtime's device in mask mode, torch's in
        gradient mode."""
        return self.onnxruntime if mode == "mask" or self.torch is None else self.torch

    def to_dict(self) -> dict:
        return {"requested": self.requested, "onnxruntime": self.onnxruntime, "torch": self.torch,
                "torch_memory_format": self.torch_memory_format}


def resolve_device(requested: str, torch_needed: bool = False) -> Placement:
    """The placement for ``requested`` (``auto`` | ``cpu`` | ``cuda``); torch's device only when
    ``torch_needed``."""
    if requested not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}; got {requested!r}")
    if requested == "auto":
        from fmt_audit.backends.onnxrt.session import cuda_available

        onnxruntime = "cuda" if cuda_available() else "cpu"
    else:
        onnxruntime = requested
    placement = Placement(requested, onnxruntime)
    return placement.with_torch() if torch_needed else placement
