"""ONNX Runtime sessions on the device the user asked for, and batched inference.

ORT silently falls back to the CPU when the CUDA provider cannot load (missing
libraries, ``onnxruntime`` installed beside ``onnxruntime-gpu``), so the
provider a session actually runs on is read back from the session and
reported, never assumed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from fmt_audit.backends.device import DEVICES
from fmt_audit.errors import DeviceError, FmtAuditError, UnsupportedModelError, first_line
from fmt_audit.model.graph import class_scores, free_fixed_batch, image_input, with_node_names
from fmt_audit.model.loading import in_one_piece

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
        try:
            return self.session.run(list(outputs) if outputs is not None else None, dict(feeds))
        except _ort_errors() as error:  # a model ORT loads but cannot run on these inputs
            raise UnsupportedModelError(f"ONNX Runtime cannot run this model: {first_line(error)}") from error


def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(getattr(state, name) for name in ("Fail", "InvalidArgument", "RuntimeException", "NotImplemented",
                                                   "InvalidGraph", "NoSuchFile", "ModelLoaded", "EPFail")
                 if isinstance(getattr(state, name, None), type))


def _threads_from_environment() -> int | None:
    """``OMP_NUM_THREADS`` when set to a positive number: the thread budget the process was given (torch
    keeps to it; Ray sets it for each task), which ONNX Runtime would otherwise ignore."""
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def create_session(model: onnx.ModelProto, device: str = "auto", threads: int | None = None,
                   quiet: bool = False) -> Session:
    """An ORT session for ``model`` on ``device`` (``auto`` | ``cpu`` | ``cuda``).

    ``auto`` takes CUDA when a session really runs there, else the CPU; ``cuda``
    raises :class:`DeviceError` when it cannot. ``quiet``: ORT prints not even its errors (for a session whose
    failures the caller handles, such as a cut graph's).
    """
    if device not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3  # ORT's warnings are about its own fusions, not the user's model
    # ORT's idle threads spin for a while after each run; beside torch (gradient mode,
    # repair) that spinning took the cores torch's backward pass needed and made it 2x slower
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    threads = threads or _threads_from_environment()
    if threads:
        options.intra_op_num_threads = threads
    given = [node.name for node in model.graph.node if node.name]
    if len(set(given)) != len(given):  # ORT refuses duplicate node names; the checker allows them
        model = with_node_names(model)
    with in_one_piece(model) as source:
        payload = source if isinstance(source, str) else source.SerializeToString()
        return _session(ort, payload, options, device)


def _session(ort, payload: bytes | str, options, device: str) -> Session:
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
    try:
        session = ort.InferenceSession(payload, options, providers=[CPU])
    except _ort_errors() as error:
        raise UnsupportedModelError(f"ONNX Runtime cannot load this model: {first_line(error)}") from error
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


def with_free_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` freed of a fixed batch size ``b`` (:func:`fmt_audit.model.graph.free_fixed_batch`) when that
    changes nothing on a check, else ``model``: ``b + 1`` seeded random images in one run must get the class
    scores they get ``b`` at a time. A graph exported without a free batch (torch's default) otherwise runs
    ``b`` images per call: the mask scan of a batch-1 graph ran one image at a time."""
    image = image_input(model)
    if image.batch is None or image.height is None or image.width is None:
        return model
    freed = with_node_names(model)
    free_fixed_batch(freed)
    probe = np.random.default_rng(0).random(
        (image.batch + 1, *image.model_shape(image.channels or 3, image.height, image.width)), dtype=np.float32)
    try:
        alone = run_batched(create_session(model, "cpu"), image.name, probe, fixed_batch=image.batch)[0]
        together = create_session(freed, "cpu").run({image.name: probe})[0]
    except (FmtAuditError, *_ort_errors()):    # the freed graph does not run: some op holds the batch size
        return model
    if together.shape != alone.shape or not np.allclose(together, alone, rtol=1e-4, atol=1e-5):
        return model
    return freed


class OrtClassifier:
    """A classifier graph as it stands, in one ORT session: logits and top-1 predictions.

    Images are in [0, 1]; ``preprocessing`` (an object with ``apply(x)``, e.g.
    :class:`fmt_audit.data.Preprocessing`) maps them to what the graph expects.
    Gradient-mode scans predict their candidate batches with this rather than the
    instrumented graph: the mask ``Mul`` nodes made those runs 1.3-1.5 times slower.
    """

    def __init__(self, model: onnx.ModelProto, device: str = "auto", preprocessing=None, batch_size: int = 256):
        model = with_free_batch(model)
        self.image = image = image_input(model)
        self.input_name, self.fixed_batch = image.name, image.batch
        self.output_name = model.graph.output[0].name
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.session = create_session(model, device)

    @property
    def provider(self) -> str:
        return self.session.provider

    def logits(self, x: np.ndarray) -> np.ndarray:
        if self.preprocessing is not None:
            x = self.preprocessing.apply(x)
        x = self.image.to_model_layout(x.astype(np.float32, copy=False))
        return class_scores(run_batched(self.session, self.input_name, x, self.batch_size,
                                        outputs=[self.output_name], fixed_batch=self.fixed_batch)[0])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(1)
