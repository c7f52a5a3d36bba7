"""ONNX Runtime sessions on the device the user asked for, and batched inference.

ORT silently falls back to the CPU when the CUDA provider cannot load (missing
libraries, ``onnxruntime`` installed beside ``onnxruntime-gpu``), so the
provider a session actually runs on is read back from the session and
reported, never assumed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import DeviceError
from .graph import with_node_names

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def _ort():
    import onnxruntime

    return onnxruntime


def cuda_available() -> bool:
    """Whether this ORT build offers the CUDA provider (it may still fail to load)."""
    return CUDA in _ort().get_available_providers()


@dataclass
class Session:
    """An ORT inference session and the provider it really runs on."""

    session: object
    provider: str

    @property
    def device(self) -> str:
        return "cuda" if self.provider == CUDA else "cpu"

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        return self.session.run(list(outputs) if outputs is not None else None, dict(feeds))


def create_session(model: onnx.ModelProto, device: str = "auto", threads: int | None = None) -> Session:
    """An ORT session for ``model`` on ``device`` (``auto`` | ``cpu`` | ``cuda``).

    ``auto`` takes CUDA when a session really runs there, else the CPU; ``cuda``
    raises :class:`DeviceError` when it cannot.
    """
    if device not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's warnings are about its own fusions, not the user's model
    if threads:
        options.intra_op_num_threads = threads
    given = [node.name for node in model.graph.node if node.name]
    if len(set(given)) != len(given):  # ORT refuses duplicate node names; the checker allows them
        model = with_node_names(model)
    payload = model.SerializeToString()
    if device in ("auto", "cuda") and cuda_available():
        try:
            session = ort.InferenceSession(payload, options, providers=[CUDA, CPU])
        except Exception as error:  # CUDA libraries present in name only
            if device == "cuda":
                raise DeviceError(f"CUDA was requested but ONNX Runtime could not use it: {error}") from error
        else:
            if session.get_providers()[0] == CUDA:
                return Session(session, CUDA)
            if device == "cuda":
                raise DeviceError("CUDA was requested but ONNX Runtime fell back to the CPU "
                                  "(is onnxruntime installed beside onnxruntime-gpu?)")
    elif device == "cuda":
        raise DeviceError("CUDA was requested but this ONNX Runtime has no CUDA provider "
                          f"(available: {', '.join(ort.get_available_providers())}); "
                          "install the 'gpu' extra instead of plain onnxruntime")
    session = ort.InferenceSession(payload, options, providers=[CPU])
    return Session(session, CPU)


def run_batched(session: Session, input_name: str, x: np.ndarray, batch_size: int = 256,
                outputs: Sequence[str] | None = None,
                extra_feeds: Mapping[str, np.ndarray] | None = None,
                fixed_batch: int | None = None) -> list[np.ndarray]:
    """Run ``x`` through ``session`` in batches and concatenate each requested output.

    ``fixed_batch`` is the model's static batch size, if it has one: batches are
    then cut to that size exactly, the last one padded with zeros (and the
    padding's outputs dropped).
    """
    if len(x) == 0:
        raise ValueError("no images to run")
    step = fixed_batch or batch_size
    chunks: list[list[np.ndarray]] = []
    for start in range(0, len(x), step):
        batch = x[start:start + step]
        real = len(batch)
        if fixed_batch and real < fixed_batch:
            batch = np.concatenate([batch, np.zeros((fixed_batch - real, *batch.shape[1:]), batch.dtype)])
        feeds = {input_name: batch, **(extra_feeds or {})}
        chunks.append([out[:real] for out in session.run(feeds, outputs)])
    return [np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(chunks[0]))]
