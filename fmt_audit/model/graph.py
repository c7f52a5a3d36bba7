"""Read-only queries on an ONNX graph: node names, Conv layers, the image input.

Layers are identified everywhere (reports, options, mask names) by their ONNX
Conv node name. Exporters may leave nodes unnamed or give two nodes one name, so
:func:`node_names` derives a stable, unique name for every node from the graph
alone: same file, same names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import numpy_helper

from fmt_audit.errors import UnsupportedModelError

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.BFLOAT16: "bfloat16",
}

Dim = int | str | None  # a static size, a symbolic name, or unknown
# a fixed batch beyond this is not a deployment choice but a broken or hostile model
# (every call would be padded to it)
MAX_FIXED_BATCH = 4096


def node_names(graph: onnx.GraphProto) -> list[str]:
    """One unique, non-empty name per node, in node order.

    A named node keeps its name; an unnamed one becomes ``<OpType>_<index>``
    (index = position in the graph); a repeated name gets ``__<k>`` appended.
    """
    taken = {node.name for node in graph.node if node.name}
    seen: set[str] = set()
    names = []
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if name in seen or (not node.name and name in taken):
            k = 1
            while f"{name}__{k}" in seen or f"{name}__{k}" in taken:
                k += 1
            name = f"{name}__{k}"
        seen.add(name)
        names.append(name)
    return names


# protobuf cannot serialise a message of 2 GiB or more; larger models live with external data
PROTOBUF_LIMIT = 2**31 - 2**20


def fits_in_protobuf(model: onnx.ModelProto) -> bool:
    """Whether ``model`` can be serialised in one piece (ONNX checker, ORT from bytes, a single file)."""
    try:
        return model.ByteSize() < PROTOBUF_LIMIT
    except Exception:   # protobuf cannot even size it (EncodeError): far past the limit
        return False


def shape_skeleton(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference, small whatever the model's size.

    Stored tensors over ``keep_bytes`` become graph inputs of the same type and
    shape: their values decide no shape (the small ones, such as Reshape targets,
    are kept). Their data is never copied.
    """
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    source, graph = model.graph, skeleton.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    declared = {value.name for value in source.input}
    for tensor in source.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL and tensor.ByteSize() <= keep_bytes:
            graph.initializer.add().CopyFrom(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return skeleton


def with_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose nodes all carry their :func:`node_names` name."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for node, name in zip(named.graph.node, node_names(named.graph)):
        node.name = name
    return named


def opset_version(model: onnx.ModelProto, domain: str = "") -> int | None:
    """The imported opset version of ``domain`` ("" is the default ONNX domain)."""
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return entry.version
    return None


def batchnorm_after(graph: onnx.GraphProto, layers: Sequence[ConvLayer]) -> dict[str, onnx.NodeProto]:
    """Per Conv layer, the BatchNormalization node that is its output's only consumer (layers without one
    are left out): the node whose scale and shift, with the Conv's filter and bias, make up a channel."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = {}
    for layer in layers:
        following = consumers.get(layer.output, [])
        if len(following) == 1 and following[0].op_type == "BatchNormalization":
            out[layer.name] = following[0]
    return out


def constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Tensors stored in the graph: initializers and Constant-node values, by value name."""
    tensors = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = attr.t
    return tensors


def nonfinite_weights(graph: onnx.GraphProto) -> list[str]:
    """Names of stored floating-point tensors that hold NaN or Inf (a broken or tampered model)."""
    found = []
    for name, tensor in constant_tensors(graph).items():
        if tensor.data_type not in FLOAT_TYPES:
            continue
        try:
            values = numpy_helper.to_array(tensor)
        except Exception:   # a malformed tensor: the checker's business, not this query's
            continue
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            found.append(name)
    return found


def _dims(value: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value == -1:
            dims.append(None)   # paddle2onnx writes a free dimension so; every runtime reads it as unknown
        elif dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and element type of a graph input or output."""

    name: str
    shape: tuple[Dim, ...] | None
    dtype: str

    @classmethod
    def from_value_info(cls, value: onnx.ValueInfoProto) -> TensorSpec:
        elem = value.type.tensor_type.elem_type
        dtype = FLOAT_TYPES.get(elem) or onnx.TensorProto.DataType.Name(elem).lower()
        return cls(value.name, _dims(value), dtype)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape) if self.shape is not None else None,
                "dtype": self.dtype}

    def shape_text(self) -> str:
        """``Nx3x224x224``; ``?`` for an unknown size or rank."""
        return "x".join("?" if d is None else str(d) for d in self.shape) if self.shape is not None else "?"


LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class ImageInput(TensorSpec):
    """The model's single image input: NCHW, or NHWC when the graph transposes it to NCHW first
    (as TensorFlow converters write). Images are handled NCHW inside the tool and
    given to the graph in its layout (:meth:`to_model_layout`)."""

    layout: str = "NCHW"

    def _size(self, axis: str) -> int | None:
        return _static(self.shape[self.layout.index(axis)]) if self.shape else None

    @property
    def channels(self) -> int | None:
        return self._size("C")

    @property
    def height(self) -> int | None:
        return self._size("H")

    @property
    def width(self) -> int | None:
        return self._size("W")

    @property
    def batch(self) -> int | None:
        """The fixed batch size, or None when the batch dimension is free."""
        return self._size("N")

    def model_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int]:
        """One image's shape as the graph takes it."""
        return (channels, height, width) if self.layout == "NCHW" else (height, width, channels)

    def to_model_layout(self, x):
        """An NCHW batch (numpy array or torch tensor) in the graph's layout."""
        if self.layout == "NCHW":
            return x
        return x.permute(0, 2, 3, 1) if hasattr(x, "permute") else np.ascontiguousarray(x.transpose(0, 2, 3, 1))

    def to_dict(self) -> dict:
        return {**super().to_dict(), "layout": self.layout}


# ops that hand an image on unchanged in layout (a PyTorch 2.x export may Cast before it Transposes)
LAYOUT_KEEPING = ("Cast", "Identity")


def _first_readers(graph: onnx.GraphProto, name: str) -> list[onnx.NodeProto]:
    """The nodes that read ``name``, looking through :data:`LAYOUT_KEEPING` ops to the nodes after them."""
    found = []
    for node in graph.node:
        if name not in node.input:
            continue
        after = _first_readers(graph, node.output[0]) if node.op_type in LAYOUT_KEEPING else []
        found.extend(after or [node])
    return found


def input_layout(graph: onnx.GraphProto, name: str) -> str:
    """``NHWC`` when every reader of input ``name`` (past Casts and Identities) is a Transpose to NCHW,
    else ``NCHW``."""
    readers = _first_readers(graph, name)
    to_nchw = all(node.op_type == "Transpose" and list(attribute(node, "perm", [])) == [0, 3, 1, 2] for node in readers)
    return "NHWC" if readers and to_nchw else "NCHW"


def _static(dim: Dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs, not initializers listed as inputs (IR < 4)."""
    initializers = {init.name for init in graph.initializer}
    return [value for value in graph.input if value.name not in initializers]


def image_input(model: onnx.ModelProto) -> ImageInput:
    """The one 4-D floating-point input; :class:`UnsupportedModelError` otherwise."""
    inputs = graph_inputs(model.graph)
    if not inputs:
        raise UnsupportedModelError("the model has no graph input; expected one 4-D float image input")
    images = []
    for value in inputs:
        spec = ImageInput.from_value_info(value)
        is_float = value.type.tensor_type.elem_type in FLOAT_TYPES
        if is_float and spec.shape is not None and len(spec.shape) == 4:
            images.append(spec)
    if not images:
        described = ", ".join(f"{s.name} {s.dtype}{list(s.shape) if s.shape else '[?]'}"
                              for s in map(TensorSpec.from_value_info, inputs))
        raise UnsupportedModelError(f"no 4-D float image input; the model's inputs are: {described}")
    if len(images) > 1:
        names = ", ".join(spec.name for spec in images)
        raise UnsupportedModelError(f"several image inputs ({names}); expected exactly one")
    bad = [d for d in images[0].shape if isinstance(d, int) and d <= 0]
    if bad:
        raise UnsupportedModelError(f"the image input {images[0].name!r} declares shape {list(images[0].shape)}; "
                                    "expected positive sizes or symbolic names")
    images[0] = replace(images[0], layout=input_layout(model.graph, images[0].name))
    if images[0].batch is not None and images[0].batch > MAX_FIXED_BATCH:
        raise UnsupportedModelError(f"the image input {images[0].name!r} declares a fixed batch of "
                                    f"{images[0].batch}; expected a free batch dimension or at most {MAX_FIXED_BATCH}")
    if len(inputs) > 1:
        others = ", ".join(v.name for v in inputs if v.name != images[0].name)
        raise UnsupportedModelError(
            f"the model has inputs besides the image input {images[0].name!r}: {others}; "
            "expected a single-input image classifier")
    return images[0]


def graph_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [TensorSpec.from_value_info(value) for value in model.graph.output]


# ops whose output is class scores and nothing else (a box or landmark head ends in Gemm/Conv, not these)
SCORE_OPS = ("Softmax", "LogSoftmax")


def _scores_shaped(spec: TensorSpec) -> bool:
    """Float, shaped ``[N, K]`` or ``[N, K, 1, 1]`` with ``K`` unknown or at least 2."""
    if spec.dtype not in FLOAT_TYPES.values() or spec.shape is None:
        return False
    shape = spec.shape
    if (len(shape) == 4 and shape[2:] != (1, 1)) or len(shape) not in (2, 4):
        return False
    return not isinstance(shape[1], int) or shape[1] >= 2


def class_output(model: onnx.ModelProto, name: str | None = None) -> TensorSpec:
    """The output that holds the class scores: ``name`` when given; the only output; else, of the outputs
    shaped like scores (float ``[N, K]`` or ``[N, K, 1, 1]``, ``K`` ≥ 2), the only one a Softmax or
    LogSoftmax makes, or the only one. :class:`UnsupportedModelError` listing the outputs otherwise."""
    outputs = graph_outputs(model)
    described = ", ".join(f"{o.name} {o.shape_text()} {o.dtype}" for o in outputs)
    if name is not None:
        chosen = [o for o in outputs if o.name == name]
        if not chosen:
            raise UnsupportedModelError(f"--class-output {name!r} is not an output of the model; its outputs: "
                                        f"{described}")
        return chosen[0]
    if not outputs:
        raise UnsupportedModelError("the model has no graph output; expected the class scores")
    if len(outputs) == 1:
        only = outputs[0]
        if only.shape is not None and not _scores_shaped(only):
            raise UnsupportedModelError(f"the model's only output {only.name} {only.shape_text()} {only.dtype} is "
                                        "not class scores; expected float [N, K] or [N, K, 1, 1] with K >= 2")
        return only
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    shaped = [o for o in outputs if _scores_shaped(o)]
    for candidates in ([o for o in shaped if producers.get(o.name) in SCORE_OPS], shaped):
        if len(candidates) == 1:
            return candidates[0]
    raise UnsupportedModelError(f"the model has {len(outputs)} outputs ({described}) and no one rule picks the "
                                "class scores; name them with --class-output NAME")


def num_classes(model: onnx.ModelProto, output: str | None = None) -> int | None:
    """Number of classes from the class-score output's declared shape (:func:`class_output`): ``K`` of
    ``[N, K]``, or of ``[N, K, 1, 1]`` (a network that ends in a global pool with no Flatten: the scores are
    read flattened, :func:`class_scores`); else its last static dimension, if declared."""
    shape = class_output(model, output).shape
    if not shape:
        return None
    sizes = [d for d in shape[1:] if d != 1]
    if len(shape) > 2 and len(sizes) == 1:
        return _static(sizes[0])
    return _static(shape[-1])


def _half_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    found = [t for t in constant_tensors(graph).values() if t.data_type == onnx.TensorProto.FLOAT16]
    found += [a.t for n in graph.node if n.op_type == "ConstantOfShape" for a in n.attribute
              if a.name == "value" and a.t.data_type == onnx.TensorProto.FLOAT16]
    return found


def is_float16(model: onnx.ModelProto) -> bool:
    """Whether ``model`` computes in float16: its image input or any stored tensor is float16."""
    graph = model.graph
    return (any(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in graph.input)
            or bool(_half_tensors(graph)))


def float32_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 graph widened to float32 (``model`` itself when it is not float16): stored tensors exactly
    widened, float16 inputs, outputs, shapes and Casts made float32. The audit runs this (CPU kernels and
    fine-tuning want float32); repaired values go back into the float16 graph by name, rounded."""
    if not is_float16(model):
        return model
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    graph = wide.graph
    for tensor in _half_tensors(graph):
        values = numpy_helper.to_array(tensor).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == onnx.TensorProto.FLOAT16:
                attr.i = onnx.TensorProto.FLOAT
    return wide


def classifier_graph(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """What every stage runs of ``model``: ``output`` its only graph output, float32 (:func:`float32_view`);
    ``model`` itself when it already is both. The other outputs' nodes stay (unused); initializers and node
    names are the same, so values trained on it are written back into ``model`` by name."""
    return float32_view(_only_output(model, output))


def _only_output(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """``model`` with ``output`` its only output and only the nodes that lead to it: the other heads' Convs are
    neither tested nor removed (a repair must not change outputs it cannot measure). Nodes keep the names
    they have in ``model`` (:func:`with_node_names` before anything is dropped)."""
    if [o.name for o in model.graph.output] == [output]:
        return model
    view = with_node_names(model)
    graph = view.graph
    kept = [o for o in graph.output if o.name == output]
    del graph.output[:]
    graph.output.extend(kept)
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in graph.node
           for attr in node.attribute):
        return view     # a subgraph may read any outer value: every node stays
    needed, used = {output}, []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            used.append(node)
            needed.update(name for name in node.input if name)
    nodes = list(reversed(used))
    del graph.node[:]
    graph.node.extend(nodes)
    return view


def class_scores(output):
    """A batch of class scores (numpy array or torch tensor) as ``[N, K]``: ``[N, K, 1, 1]`` flattened;
    :class:`UnsupportedModelError` for any other shape (the output read is not class scores)."""
    if output.ndim == 2:
        return output
    if output.ndim == 4 and tuple(output.shape[2:]) == (1, 1):
        return output.reshape(len(output), -1)
    raise UnsupportedModelError(f"the class-score output gives shape {list(output.shape)}; expected [N, K] or "
                                "[N, K, 1, 1] (name the scores with --class-output)")


# channels of Conv layers: layer name -> output channel indices (what is flagged, removed, held at zero)
ChannelSet = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class ConvLayer:
    """One Conv node, as the tool sees it."""

    name: str
    index: int                   # position of the node in the graph (execution order)
    output: str                  # the Conv's output value name
    weight: str                  # value name of the weight (initializer, Constant or computed)
    bias: str | None
    out_channels: int
    in_channels: int | None      # per-group input channels x groups
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    groups: int
    weight_stored: bool          # False when the weight is computed by other nodes
    # height x width of the Conv's output at the declared input size (None: unknown). 1x1 maps
    # are tested like any other: a squeeze-and-excitation Conv's channel gates a whole feature
    # map of the main path (README, "Which layers are tested"); --skip-layers leaves them out.
    feature_map: tuple[int, int] | None = None

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.in_channels == self.groups

    @property
    def one_by_one(self) -> bool:
        """The output feature map is a single pixel (e.g. squeeze-and-excitation)."""
        return self.feature_map == (1, 1)

    @property
    def grouped(self) -> bool:
        return self.groups > 1

    def to_dict(self) -> dict:
        return {"name": self.name, "out_channels": self.out_channels, "in_channels": self.in_channels,
                "kernel": list(self.kernel), "strides": list(self.strides), "groups": self.groups,
                "depthwise": self.depthwise, "weight_stored": self.weight_stored,
                "feature_map": list(self.feature_map) if self.feature_map else None}


def attribute(node: onnx.NodeProto, name: str, default):
    """The value of ``node``'s attribute ``name``, or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...] | None]:
    """Every value's shape ONNX shape inference finds (a best effort: ``{}``-like gaps where it cannot)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model))
    except Exception:  # inference is a best effort here; the loader already validated
        inferred = model
    graph = inferred.graph
    return {v.name: _dims(v) for v in [*graph.value_info, *graph.input, *graph.output]}


def conv_layers(model: onnx.ModelProto) -> list[ConvLayer]:
    """Every 2-D Conv node of the main graph, in execution (node) order."""
    graph = model.graph
    stored = constant_tensors(graph)
    shapes = inferred_shapes(model)
    layers = []
    for index, (node, name) in enumerate(zip(graph.node, node_names(graph))):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.input[1]
        if weight in stored:
            wshape: Sequence[Dim] = tuple(stored[weight].dims)
        else:
            wshape = shapes.get(weight) or ()
        if len(wshape) != 4 or not all(isinstance(d, int) for d in wshape):
            if len(wshape) not in (0, 4):
                continue  # 1-D or 3-D convolution: not an image feature map
            raise UnsupportedModelError(
                f"Conv {name!r}: cannot determine the weight shape of {weight!r}")
        groups = int(attribute(node, "group", 1))
        out_c, in_per_group = int(wshape[0]), int(wshape[1])
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        out = shapes.get(node.output[0]) or ()
        size = tuple(out[2:]) if len(out) == 4 and all(isinstance(d, int) and d > 0 for d in out[2:]) else None
        layers.append(ConvLayer(
            name=name, index=index, output=node.output[0], weight=weight, bias=bias,
            out_channels=out_c, in_channels=in_per_group * groups,
            kernel=tuple(int(k) for k in wshape[2:]),
            strides=tuple(int(s) for s in attribute(node, "strides", [1, 1])),
            groups=groups, weight_stored=weight in stored, feature_map=size,
        ))
    return layers


def last_conv_layers(model: onnx.ModelProto, layers: Sequence[ConvLayer]) -> list[ConvLayer]:
    """The Conv layers with no Conv after them on any path to the outputs, in node order
    (in a ResNet: the last block's second Conv and, if it has one, its projection shortcut)."""
    graph = model.graph
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    conv_below = [False] * len(graph.node)     # some Conv consumes what this node computes, directly or later
    for index in range(len(graph.node) - 1, -1, -1):
        conv_below[index] = any(graph.node[c].op_type == "Conv" or conv_below[c]
                                for output in graph.node[index].output for c in consumers.get(output, ()))
    return [layer for layer in layers if not conv_below[layer.index]]


def unique_name(graph: onnx.GraphProto, base: str) -> str:
    """``base.k`` for the first ``k`` from 1 that names no tensor or value of ``graph``."""
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {v.name for v in graph.input}
    number = 1
    while f"{base}.{number}" in taken:
        number += 1
    return f"{base}.{number}"


def free_fixed_batch(model: onnx.ModelProto) -> int:
    """Free ``model`` (in place), a graph fixed to batch size ``b``, to run larger batches; the number of
    Reshapes rewritten.

    Exporters given a fixed input shape write ``b`` into Reshape targets (``[1, -1]``).
    A target's leading ``b`` becomes 0 (copy the input's leading dimension, the batch),
    and the input and outputs get a symbolic batch. Callers change a copy, then verify image by image that
    batches stay independent (``fmt_audit.backends.torch.bridge.check_free_batch``,
    ``fmt_audit.backends.onnxrt.session.with_free_batch``): other ops may still hold the batch size.
    """
    try:
        image = image_input(model)
    except UnsupportedModelError:
        return 0
    batch = image.batch
    if batch is None or image.height is None or image.width is None:   # no way to check the result
        return 0
    stored = constant_tensors(model.graph)
    from_image = {image.name}       # values computed from the image (Reshapes of constants keep their shape)
    for node in model.graph.node:
        if any(name in from_image for name in node.input):
            from_image.update(node.output)
    rewritten = 0
    for node in model.graph.node:
        if (node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in stored
                or node.input[0] not in from_image):
            continue
        if any(a.name == "allowzero" and a.i == 1 for a in node.attribute):
            continue
        target = numpy_helper.to_array(stored[node.input[1]])
        if target.ndim != 1 or len(target) < 2 or int(target[0]) != batch:
            continue
        freed = target.copy()
        freed[0] = 0
        copy = numpy_helper.from_array(freed, unique_name(model.graph, node.input[1]))
        model.graph.initializer.append(copy)
        node.input[1] = copy.name
        rewritten += 1
    for value in [*(v for v in model.graph.input if v.name == image.name), *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]     # shapes inferred at the fixed batch
    return rewritten
