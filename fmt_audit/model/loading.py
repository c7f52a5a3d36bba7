"""Loading and validating untrusted ONNX files.

A model file comes from someone else: it may be truncated, not ONNX at all, or
point its external data at files elsewhere on the machine. :func:`load_model`
reads it, refuses external data outside the model's own folder, runs the full
ONNX checker and shape inference, and finds the image input and the Conv layers
— everything later stages need to trust.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from fmt_audit.errors import ModelLoadError, UnsupportedModelError, first_line
from fmt_audit.model.graph import (
    ConvLayer,
    ImageInput,
    TensorSpec,
    class_output,
    classifier_graph,
    conv_layers,
    fits_in_protobuf,
    image_input,
    num_classes,
)


@dataclass(frozen=True)
class LoadedModel:
    """A validated model and what the tool needs to know about it.

    ``proto`` is the model as stored (external data read in), untouched: repaired
    weights are written back into a copy of it, so names and structure survive.
    ``output`` is the output that holds the class scores; :attr:`classifier`, the graph every stage runs.
    """

    path: Path
    sha256: str
    proto: onnx.ModelProto = field(repr=False)
    image_input: ImageInput
    num_classes: int | None
    layers: tuple[ConvLayer, ...]
    external_data: tuple[str, ...]  # external data files, relative to the model's folder
    output: TensorSpec | None = None    # the class scores (None: the first output)
    run_at: tuple[int, int] | None = None   # (height, width) given to a graph that leaves them free

    @property
    def scores(self) -> str:
        """The name of the output that holds the class scores."""
        return self.output.name if self.output is not None else self.proto.graph.output[0].name

    @functools.cached_property
    def classifier(self) -> onnx.ModelProto:
        """What every stage runs: ``proto`` with the class-score output its only output and only the nodes that
        lead to it, float16 widened to float32, run at :attr:`run_at` (``proto`` itself when it already is all
        that)."""
        graph = classifier_graph(self.proto, self.scores)
        return graph if self.run_at is None else _with_image_size(graph, self.image_input, *self.run_at)

    def at_image_size(self, height: int, width: int) -> LoadedModel:
        """This model run at ``height`` x ``width``: where the graph leaves its image input's height or width
        unknown, :attr:`classifier` declares the size of the images it is given (the PyTorch bridge cannot pad
        a strided ``SAME`` Conv, nor the verdict size its images, without it), and :attr:`run_at` records it
        (a copy with other weights, ``dataclasses.replace(model, proto=...)``, keeps it). ``proto`` is
        unchanged, so the repaired file keeps the free sizes. Itself when both sizes are declared."""
        image = self.image_input
        if image.shape is None or (image.height is not None and image.width is not None):
            return self
        axes = {image.layout.index("H"): height, image.layout.index("W"): width}
        shape = tuple(axes[axis] if axis in axes and not (isinstance(d, int) and d > 0) else d
                      for axis, d in enumerate(image.shape))
        sized = replace(self, image_input=replace(image, shape=shape), run_at=(height, width))
        sized.__dict__["classifier"] = _with_image_size(self.classifier, image, height, width)
        return sized


def _with_image_size(model: onnx.ModelProto, image: ImageInput, height: int, width: int) -> onnx.ModelProto:
    """A copy of ``model`` whose input ``image`` declares ``height`` and ``width`` where it left them free."""
    sized = onnx.ModelProto()
    sized.CopyFrom(model)
    declared = next(value for value in sized.graph.input if value.name == image.name)
    for axis, size in ((image.layout.index("H"), height), (image.layout.index("W"), width)):
        dim = declared.type.tensor_type.shape.dim[axis]
        if not (dim.HasField("dim_value") and dim.dim_value > 0):
            dim.Clear()
            dim.dim_value = size
    return sized


def _tensors_with_data(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor that can hold data: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors_with_data(attr.g)
            for sub in attr.graphs:
                yield from _tensors_with_data(sub)


def _undecodable_text(message) -> str | None:
    """The first string field that protobuf could not decode as UTF-8 (it then hands back bytes), if any."""
    for descriptor, value in message.ListFields():
        values = [value] if isinstance(value, (str, bytes, Message)) else value    # one value or a repeated field
        if descriptor.type == FieldDescriptor.TYPE_STRING:
            if any(isinstance(v, bytes) for v in values):
                return descriptor.name
        elif descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            for item in values:
                if (found := _undecodable_text(item)) is not None:
                    return found
    return None


def _external_location(tensor: onnx.TensorProto) -> str | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    raise ModelLoadError(f"tensor {tensor.name!r} is marked external but names no location")


def check_external_data(model: onnx.ModelProto, folder: Path) -> tuple[str, ...]:
    """Refuse external-data locations that are absolute, climb with '..', or leave ``folder``.

    Returns the distinct locations, all inside ``folder``.
    """
    root = folder.resolve()
    locations: list[str] = []
    for tensor in _tensors_with_data(model.graph):
        location = _external_location(tensor)
        if location is None or location in locations:
            continue
        parts = Path(location).parts
        if Path(location).is_absolute() or location.startswith(("/", "\\")) or ".." in parts \
                or ":" in location:
            raise ModelLoadError(
                f"external data location {location!r} of tensor {tensor.name!r} is not a plain "
                "relative path inside the model's folder; refused")
        try:
            resolved = (root / location).resolve()
            inside, present = resolved.is_relative_to(root), resolved.is_file()
        except (ValueError, OSError) as error:    # a NUL byte, a name too long for the file system
            raise ModelLoadError(f"external data location {location!r} of tensor {tensor.name!r} is not a "
                                 f"usable file name ({first_line(error)}); refused") from error
        if not inside:
            raise ModelLoadError(
                f"external data {location!r} resolves outside the model's folder ({resolved}); refused")
        if not present:
            raise ModelLoadError(f"external data file {location!r} (for tensor {tensor.name!r}) is missing")
        locations.append(location)
    return tuple(locations)


def model_files(path: str | os.PathLike) -> list[Path]:
    """The model file and the external data files it names: what an output must never overwrite.

    Best effort: a model that cannot be parsed is reported by :func:`load_model` later.
    """
    path = Path(path)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
        return [path, *(path.parent / location for location in check_external_data(model, path.parent))]
    except Exception:
        return [path]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_model(path: str | os.PathLike) -> tuple[Path, onnx.ModelProto, tuple[str, ...]]:
    """Parse ``path`` and read its external data, refusing anything outside its folder."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, TypeError) as error:
        raise ModelLoadError(f"{path} is not an ONNX model (protobuf parse failed: {first_line(error)})") \
            from error
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {first_line(error)}") from error
    if not model.HasField("graph") or not model.graph.node:
        raise ModelLoadError(f"{path} is not an ONNX model (it has no graph nodes)")
    if not model.opset_import:
        raise ModelLoadError(f"{path} is not a valid ONNX model (it imports no opset)")
    if (field := _undecodable_text(model)) is not None:
        raise ModelLoadError(f"{path} is not a valid ONNX model (its {field} is not UTF-8 text)")
    external = check_external_data(model, path.parent)
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as error:  # a truncated or unreadable data file
            raise ModelLoadError(f"cannot read the external data of {path}: {first_line(error)}") from error
    return path, model, external


def run_checker(model: onnx.ModelProto, path: Path | None = None) -> None:
    """The full ONNX checker (with strict shape inference).

    A model of 2 GiB or more cannot be serialised in one piece: it is checked as
    the file ``path`` (with its external data), or as a temporary copy.
    """
    if path is not None and not fits_in_protobuf(model):
        onnx.checker.check_model(str(path), full_check=True)
        return
    with in_one_piece(model) as source:
        onnx.checker.check_model(source, full_check=True)


def validate(model: onnx.ModelProto, path: Path) -> None:
    """The full ONNX checker on the model as loaded (its file, when it is 2 GiB or more)."""
    try:
        run_checker(model, path)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ModelLoadError(f"{path} fails the ONNX checker: {first_line(error)}") from error
    except Exception as error:
        raise ModelLoadError(f"{path} fails the ONNX checker: {first_line(error)}") from error


def load_model(path: str | os.PathLike, class_output_name: str | None = None) -> LoadedModel:
    """Read, validate and describe an ONNX image classifier; ``class_output_name``: the output that holds the
    class scores (None: :func:`fmt_audit.model.graph.class_output`'s rule).

    Raises :class:`ModelLoadError` for files that are not valid ONNX and
    :class:`UnsupportedModelError` for valid models the tool cannot audit.
    """
    path, model, external = read_model(path)
    validate(model, path)
    image = image_input(model)
    no_conv = UnsupportedModelError(f"{path} has no 2-D Conv node; feature map testing needs convolutions")
    if not any(node.op_type == "Conv" for node in model.graph.node):
        raise no_conv
    scores = class_output(model, class_output_name)
    runnable = classifier_graph(model, scores.name)
    layers = tuple(conv_layers(runnable))    # the Convs the class scores depend on
    if not layers:
        raise no_conv
    loaded = LoadedModel(path=path, sha256=sha256_of(path), proto=model, image_input=image,
                         num_classes=num_classes(model, scores.name), layers=layers, external_data=external,
                         output=scores)
    loaded.__dict__["classifier"] = runnable    # the cached property's value: a multi-output or float16 graph is
    return loaded                              # copied once, not again on first use


def save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Save ``model`` as ``path`` plus ``<name>.data`` beside it (any size; ``model`` is not modified)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)    # onnx.save_model moves the tensors of the model it is given out to the file
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


@contextlib.contextmanager
def in_one_piece(model: onnx.ModelProto) -> Iterator[onnx.ModelProto | str]:
    """``model`` itself when protobuf can serialise it, else the path of a temporary copy saved with
    external data (removed on exit): what the ONNX checker, ONNX Runtime and onnx2torch accept for a
    model of 2 GiB or more (protobuf refuses to serialise one, even to size it)."""
    if fits_in_protobuf(model):
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="fmt-audit-") as folder:
        path = Path(folder) / "model.onnx"
        save_with_external_data(model, path)
        yield str(path)
