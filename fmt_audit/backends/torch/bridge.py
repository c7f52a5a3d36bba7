"""The PyTorch bridge: ONNX graph -> ``torch.nn.Module`` for gradients and fine-tuning,
and trained values -> the original graph's initializers.

Conversion goes through onnx2torch after normalising the graph (Constant-node
tensors lifted to initializers, graphs newer than onnx2torch's opset range
down-converted and older ones whose ops it lacks converted up,
``Reshape(allowzero=1)`` relaxed where provably equivalent, a fixed batch size
freed where a check on random images finds them independent).
Every trainable parameter and BatchNorm statistic of the module is tied to the
ONNX tensor it came from, so :func:`write_back` can copy values into the
*original* graph: same nodes, names, opset and metadata, only tensor values
change (save where one stored tensor must become several, see :func:`write_back`),
and a parameter that did not change keeps its exact original bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from fmt_audit.backends.torch.ops import MAX_BRIDGE_OPSET, UPGRADE_OPSETS, unsupported_ops
from fmt_audit.backends.torch.padding import explicit_pads
from fmt_audit.data import Dataset, Preprocessing
from fmt_audit.errors import BridgeError, DeviceError, UnsupportedModelError, first_line
from fmt_audit.model.graph import (
    ImageInput,
    attribute,
    batchnorm_after,
    class_scores,
    constant_tensors,
    conv_layers,
    free_fixed_batch,
    image_input,
    inferred_shapes,
    opset_version,
    unique_name,
    with_node_names,
)
from fmt_audit.model.loading import in_one_piece

# On a CPU, torch's convolutions (oneDNN) run forward and backward faster on the CIFAR-10 networks with
# activations and weights in channels-last order (benchmarks/memory_format.py: the verdict's trigger search
# 1.13x on a VGG, 1.34x on a PreAct-ResNet, 1.85x on a MobileNetV2); logits agree with the default order to
# about 1e-6 of their size. Unmeasured on CUDA, so left there as it is. Benchmarks set this False in their
# own process to measure the difference.
CHANNELS_LAST_ON_CPU = True
# channels-last must give the default order's logits within this, relative to max(1, |largest|), on a probe
# of seeded random images, or the module stays in the default order
LAYOUT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParameterSource:
    """Where a module tensor came from in the ONNX graph, and how it was transformed.

    ``torch value = (onnx value * scale)`` then transposed if ``transpose``.
    """

    tensor: str                 # initializer name, or output name of a Constant node
    original: np.ndarray = field(repr=False)  # torch value right after conversion
    transpose: bool = False
    scale: float = 1.0
    consumer: str = ""          # first output name of the node that reads the tensor
    input_index: int = 0        # ... as its input number

    def to_onnx(self, value: np.ndarray) -> np.ndarray:
        if self.transpose:
            value = value.T
        if self.scale != 1.0:
            value = value / self.scale
        return value


@dataclass
class TorchBridge:
    """A converted module and its ties back to the ONNX graph."""

    module: torch.nn.Module
    sources: dict[str, ParameterSource]     # state_dict key -> ONNX tensor
    conv_modules: dict[str, torch.nn.Module]  # Conv node name -> module whose output is the Conv's
    steps: list[str]                        # normalisation applied before conversion
    # Conv node name -> module whose output carries the Conv's channels to the rest of the
    # network: the BatchNormalization that is the Conv output's only consumer, else the Conv
    channel_modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    image: ImageInput | None = None         # the graph's image input (its layout), if it has one
    # device type -> the memory format the module runs in there (decided once: memory_format_on)
    memory_formats: dict[str, torch.memory_format] = field(default_factory=dict, repr=False)

    def conv_weights(self, layer: str) -> torch.nn.Conv2d:
        module = self.conv_modules[layer]
        return module[-1] if isinstance(module, torch.nn.Sequential) else module

    def memory_format_on(self, device: str | torch.device) -> torch.memory_format:
        """The memory format the module's activations and 4-D weights take on ``device`` (the module already
        there), the module converted to it: channels-last on a CPU where :data:`CHANNELS_LAST_ON_CPU` and a
        probe gives the same logits (an NCHW image of known size), else the default order."""
        kind = torch.device(device).type
        if kind not in self.memory_formats:
            self.memory_formats[kind] = (torch.channels_last if kind == "cpu" and CHANNELS_LAST_ON_CPU
                                         and _channels_last_agrees(self) else torch.contiguous_format)
        chosen = self.memory_formats[kind]
        self.module.to(memory_format=chosen)
        return chosen

    def memory_format_name(self, device: str | None) -> str | None:
        """``channels_last`` or ``contiguous``: the format decided for ``device`` (None: not placed there yet)."""
        chosen = self.memory_formats.get(torch.device(device).type) if device is not None else None
        return None if chosen is None else "channels_last" if chosen is torch.channels_last else "contiguous"


def _channels_last_agrees(bridge: TorchBridge) -> bool:
    """Whether the module (on the CPU, in the default order) gives the same logits in channels-last order on
    seeded random images; the module is left in the default order and in the modes it was found in."""
    image = bridge.image
    module = bridge.module
    four_d = any(parameter.dim() == 4 for parameter in module.parameters())
    if (image is None or image.layout != "NCHW" or image.height is None or image.width is None
            or not image.channels or not four_d):
        return False
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(image.batch or 2, image.channels, image.height, image.width, generator=generator)
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            default = class_scores(module(probe)).float()
            module.to(memory_format=torch.channels_last)
            reordered = class_scores(module(probe.contiguous(memory_format=torch.channels_last))).float()
        gap = float((default - reordered).abs().max())
        return gap <= LAYOUT_TOLERANCE * max(1.0, float(default.abs().max()))
    except Exception:  # an op that cannot take channels-last tensors: the default order, as converted
        return False
    finally:
        module.to(memory_format=torch.contiguous_format)
        for sub, training in modes:
            sub.training = training


class BridgedClassifier:
    """The bridge's module taking [0, 1] pixel-space images: preprocessing applied inside, in the memory
    format its convolutions run fastest in on the device (:meth:`TorchBridge.memory_format_on`)."""

    def __init__(self, bridge: TorchBridge, preprocessing: Preprocessing, device: str = "cpu"):
        self.bridge = bridge
        self.module = bridge.module.to(device)
        bridge.memory_format_on(device)
        self.device = device
        self._device_type = torch.device(device).type
        self.preprocessing = preprocessing
        self._scale, self._offset = (torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                                     for v in preprocessing.affine())

    @property
    def memory_format(self) -> torch.memory_format:
        """The format the shared module runs in on this classifier's device type (the bridge holds it: a
        classifier on another device type may have placed the module since)."""
        return self.bridge.memory_formats[self._device_type]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel-space images -> what the ONNX model takes."""
        return x * self._scale + self._offset

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        normalized = self.normalize(x)
        if self.memory_format is torch.channels_last:      # an NCHW graph: nothing to permute
            return class_scores(self.module(normalized.contiguous(memory_format=torch.channels_last)))
        return class_scores(self.module(self.bridge.image.to_model_layout(normalized) if self.bridge.image
                                        else normalized))

    def logits(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Eval-mode logits for a float NCHW [0, 1] array."""
        self.module.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(self.device)
                out.append(self(batch).float().cpu().numpy())
        return np.concatenate(out)

    def accuracy(self, data: Dataset, batch_size: int = 256) -> float:
        return float((self.logits(data.x, batch_size).argmax(1) == data.y).mean())


def batch_mixing(bridge: TorchBridge, image: ImageInput) -> str | None:
    """Why the converted module of a graph declared with a fixed batch size ``b`` cannot run larger batches
    with their images independent; ``None`` when it can (or the batch is free).

    Checked on ``b + 1`` seeded random images: one forward pass at ``b + 1`` must
    give every image the logits it gets in a batch of ``b``.
    """
    if image.batch is None or image.height is None or image.width is None:
        return None
    batch = image.batch
    generator = torch.Generator().manual_seed(0)
    # on the module's device: a module a scan already moved to CUDA must not read as "batch baked in"
    device = next((t.device for t in (*bridge.module.parameters(), *bridge.module.buffers())), torch.device("cpu"))
    probe = torch.rand(batch + 1, *image.model_shape(image.channels or 3, image.height, image.width),
                       generator=generator).to(device)
    try:
        with torch.no_grad():
            together = bridge.module(probe)
            alone = torch.cat([bridge.module(torch.cat([chunk, chunk.new_zeros(batch - len(chunk), *chunk.shape[1:])]))
                               [:len(chunk)] for chunk in probe.split(batch)])
    except Exception as error:  # the module rejects the larger batch: the batch size is baked in
        return first_line(error)
    if together.shape != alone.shape:
        return f"output shape {tuple(together.shape)} at batch {batch + 1}, {tuple(alone.shape)} image by image"
    gap = float((together - alone).abs().max())
    if gap > 1e-4 * max(1.0, float(alone.abs().max())):
        return f"images in one batch change each other's logits by up to {gap:.3g}"
    return None


def check_free_batch(bridge: TorchBridge, image: ImageInput, why: str) -> None:
    """:class:`UnsupportedModelError` unless the bridge's module runs batches larger than a fixed
    batch size the graph declares, images independent (:func:`batch_mixing`)."""
    problem = batch_mixing(bridge, image)
    if problem is not None:
        raise UnsupportedModelError(
            f"the graph is fixed to batch size {image.batch} ({problem}); {why} needs larger "
            "batches: re-export it with a free batch dimension (torch: dynamic_axes={'input': {0: 'n'}})")


def torch_device(requested: str) -> str:
    """The torch device for ``auto`` | ``cpu`` | ``cuda``; :class:`DeviceError` if CUDA is asked but absent."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but PyTorch sees no usable GPU")
    return "cuda" if requested in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def _lift_constants(model: onnx.ModelProto) -> int:
    """Move Constant-node tensors into initializers (onnx2torch reads weights only from there)."""
    lifted = 0
    for node in list(model.graph.node):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        tensor = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        if tensor is None:
            continue
        initializer = onnx.TensorProto()
        initializer.CopyFrom(tensor)
        initializer.name = node.output[0]
        model.graph.initializer.append(initializer)
        model.graph.node.remove(node)
        lifted += 1
    return lifted


def _stored_identities(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Identity nodes that copy a stored tensor, by output name.

    torch's exporter writes a tensor once and gives every further use an Identity
    of it (e.g. the equal biases of freshly folded BatchNorms); onnx2torch reads a
    Conv's or Gemm's parameters only from initializers.
    """
    stored = constant_tensors(graph)
    outputs = {value.name for value in graph.output}
    return {node.output[0]: node for node in graph.node
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input
            and node.input[0] in stored and node.output[0] not in outputs}


def _materialize_identity(graph: onnx.GraphProto, node: onnx.NodeProto) -> None:
    """Replace ``node`` (an Identity of a stored tensor) by an initializer of its output's name."""
    copy = onnx.TensorProto()
    copy.CopyFrom(constant_tensors(graph)[node.input[0]])
    copy.name = node.output[0]
    graph.initializer.append(copy)
    graph.node.remove(node)
    if any(value.name == node.input[0] for value in graph.input):   # IR 3: initializers are graph inputs too
        graph.input.append(onnx.helper.make_tensor_value_info(copy.name, copy.data_type, copy.dims))


def _inline_identities(model: onnx.ModelProto) -> int:
    identities = _stored_identities(model.graph)
    for node in identities.values():
        _materialize_identity(model.graph, node)
    return len(identities)


def _constant_arrays(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Stored values by name, Constant nodes written with ``value_int(s)`` (as torch's dynamo exporter does) too."""
    arrays = {name: numpy_helper.to_array(tensor) for name, tensor in constant_tensors(graph).items()}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name in ("value_int", "value_ints"):
                    arrays[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(attr), np.int64)
    return arrays


def _batch_sizes(graph: onnx.GraphProto, image: str) -> set[str]:
    """Values that hold the image input's batch size: its ``Shape`` cut to the first dimension (or ``Gather``
    of index 0 of the whole shape), and what ``Squeeze``, ``Unsqueeze``, ``Cast``, ``Identity`` and ``Reshape``
    make of that one number."""
    arrays = _constant_arrays(graph)
    shapes = {node.output[0] for node in graph.node if node.op_type == "Shape" and node.input[0] == image
              and attribute(node, "start", 0) == 0 and attribute(node, "end", None) is None}
    found: set[str] = set()
    for node in graph.node:
        if node.op_type == "Shape" and node.input[0] == image and attribute(node, "start", 0) == 0 \
                and attribute(node, "end", None) == 1:
            found.add(node.output[0])
        elif node.op_type == "Gather" and node.input[0] in shapes and node.input[1] in arrays \
                and arrays[node.input[1]].size == 1 and int(arrays[node.input[1]].reshape(-1)[0]) == 0:
            found.add(node.output[0])
        elif node.op_type in ("Squeeze", "Unsqueeze", "Cast", "Identity", "Reshape") and node.input[0] in found:
            found.add(node.output[0])
    return found


def _relax_allowzero(model: onnx.ModelProto) -> int:
    """Set Reshape ``allowzero`` to 0 where no entry of the target shape can be 0, so that the attribute changes
    nothing (onnx2torch rejects it): a stored shape without 0, or a ``Concat`` of such constants and the
    image batch size (torch's dynamo exporter writes ``view(x.size(0), -1)`` so), which is at least 1 whenever
    the bridge runs (it never runs an empty batch)."""
    arrays = _constant_arrays(model.graph)
    try:
        batch = _batch_sizes(model.graph, image_input(model).name)
    except UnsupportedModelError:
        batch = set()
    concats = {node.output[0]: node for node in model.graph.node if node.op_type == "Concat"}

    def never_zero(name: str) -> bool:
        if name in arrays:
            return 0 not in arrays[name]
        if name in batch:
            return True
        return name in concats and all(never_zero(part) for part in concats[name].input)

    relaxed = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        for attr in node.attribute:
            if attr.name == "allowzero" and attr.i == 1 and never_zero(node.input[1]):
                attr.i = 0
                relaxed += 1
    return relaxed


def _splits_as_slices(model: onnx.ModelProto) -> int:
    """Rewrite each Split as one Slice per output (same values); the number rewritten.

    onnx's version converter has no adapter taking Split down from opset 18 (its
    ``num_outputs`` form), so a newer graph with a Split could not reach
    onnx2torch's range. Slice is the same from opset 13 to 20. A Split whose sizes
    cannot be known (computed sizes, an unknown axis length) is left as it is.
    """
    stored = constant_tensors(model.graph)
    shapes: dict | None = None
    nodes, rewritten = [], 0
    for node in model.graph.node:
        if node.op_type != "Split" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        axis = int(attribute(node, "axis", 0))
        if len(node.input) > 1 and node.input[1]:
            sizes = ([int(v) for v in numpy_helper.to_array(stored[node.input[1]])]
                     if node.input[1] in stored else None)
        else:
            shapes = shapes if shapes is not None else inferred_shapes(model)
            dims = shapes.get(node.input[0]) or ()
            length = dims[axis] if -len(dims) <= axis < len(dims) else None
            count = int(attribute(node, "num_outputs", len(node.output)))
            sizes = None
            if isinstance(length, int) and count == len(node.output):
                chunk = -(-length // count)     # the last part takes what is left (Split-18's rule)
                sizes = [chunk] * (count - 1) + [length - chunk * (count - 1)]
        if sizes is None or len(sizes) != len(node.output):
            nodes.append(node)
            continue
        start = 0
        for number, (size, output) in enumerate(zip(sizes, node.output)):
            bounds = []
            for label, value in (("starts", start), ("ends", start + size), ("axes", axis)):
                tensor = numpy_helper.from_array(np.array([value], np.int64),
                                                 unique_name(model.graph, f"{node.name or output}.{label}"))
                model.graph.initializer.append(tensor)
                bounds.append(tensor.name)
            nodes.append(onnx.helper.make_node("Slice", [node.input[0], *bounds], [output],
                                               name=f"{node.name or output}/slice{number}"))
            start += size
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten


def _upgraded(model: onnx.ModelProto, opset: int, needing: list[str], steps: list[str]) -> onnx.ModelProto:
    """``model`` converted up to the first of ``UPGRADE_OPSETS`` at which onnx2torch converts every op;
    unchanged if none."""
    failures = []
    for target in UPGRADE_OPSETS:
        if target <= opset:
            continue
        try:
            converted = onnx.version_converter.convert_version(model, target)
        except Exception as error:   # the converter lacks an adapter on the way: try a later target
            failures.append(f"to {target}: {first_line(error)}")
            continue
        if not unsupported_ops(converted, convert=False):
            steps.append(f"converted opset {opset} -> {target} (for {', '.join(needing)})")
            return converted
    if failures:
        steps.append(f"could not convert opset {opset} up ({'; '.join(failures)})")
    return model


def prepare_for_torch(model: onnx.ModelProto, free_batch: bool = True) -> tuple[onnx.ModelProto, list[str]]:
    """The normalised copy of ``model`` that onnx2torch converts, and the steps taken."""
    prepared = with_node_names(model)
    steps: list[str] = []
    if lifted := _lift_constants(prepared):
        steps.append(f"lifted {lifted} Constant tensors to initializers")
    if inlined := _inline_identities(prepared):
        steps.append(f"made {inlined} Identity copies of stored tensors initializers")
    opset = opset_version(prepared) or 0
    if opset > MAX_BRIDGE_OPSET and (needing := unsupported_ops(prepared, convert=False)):
        if sliced := _splits_as_slices(prepared):
            steps.append(f"wrote {sliced} Split nodes as Slices (onnx cannot convert Split down from opset 18)")
        try:
            prepared = onnx.version_converter.convert_version(prepared, MAX_BRIDGE_OPSET)
        except Exception as error:
            raise BridgeError(f"cannot convert the graph from opset {opset} to {MAX_BRIDGE_OPSET} for the "
                              f"PyTorch bridge ({', '.join(needing)} need it): {error}") from error
        steps.append(f"converted opset {opset} -> {MAX_BRIDGE_OPSET} (for {', '.join(needing)})")
    elif opset and (needing := unsupported_ops(prepared, convert=False)):
        prepared = _upgraded(prepared, opset, needing, steps)
    padded, unpadded = explicit_pads(prepared)
    if unpadded:
        raise BridgeError(f"the PyTorch bridge (onnx2torch) cannot convert {unpadded[0]}"
                          f"{f' (and {len(unpadded) - 1} more)' if len(unpadded) > 1 else ''}; mask mode runs "
                          "without the bridge")
    if padded:
        steps.append(f"wrote auto_pad as explicit pads on {padded} nodes")
    if relaxed := _relax_allowzero(prepared):
        steps.append(f"relaxed allowzero on {relaxed} Reshape nodes")
    if free_batch and (freed := free_fixed_batch(prepared)):
        steps.append(f"freed the fixed batch size ({freed} Reshape targets copy it from their input); "
                     "checked image by image at a larger batch")
    if missing := unsupported_ops(prepared, convert=False):
        tried = next((f"; {step}" for step in steps if step.startswith("could not convert")), "")
        raise BridgeError(f"the PyTorch bridge (onnx2torch) cannot convert these ops: {', '.join(missing)}{tried}")
    computed = [layer.name for layer in conv_layers(prepared) if not layer.weight_stored]
    if computed:   # e.g. DequantizeLinear of int8 weights; onnx2torch reads Conv weights only from initializers
        raise BridgeError(f"{len(computed)} Conv layer(s) compute their weights from other nodes ({computed[0]!r}"
                          f"{' and others' if len(computed) > 1 else ''}); the PyTorch bridge needs stored "
                          "weights, so gradient mode and repair cannot run on this model (mask mode can)")
    return prepared, steps


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


def _sources_by_node(prepared: onnx.ModelProto, modules: dict[str, torch.nn.Module]
                     ) -> dict[str, ParameterSource]:
    """Tie module tensors to ONNX tensors, node by node, for the ops onnx2torch turns into layers."""
    sources: dict[str, ParameterSource] = {}
    for node in prepared.graph.node:
        entry = modules.get(node.output[0]) if node.output else None
        if entry is None:
            continue
        prefix, module = entry
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        inner = module[-1] if isinstance(module, torch.nn.Sequential) else module
        inner_prefix = f"{prefix}.{len(module) - 1}" if isinstance(module, torch.nn.Sequential) else prefix
        ties: list[tuple[str, int, bool, float]] = []  # (module tensor, node input number, transpose, scale)
        if node.op_type in ("Conv", "ConvTranspose") and isinstance(inner, torch.nn.modules.conv._ConvNd):
            ties = [("weight", 1, False, 1.0)]
            if len(node.input) > 2 and node.input[2]:
                ties.append(("bias", 2, False, 1.0))
        elif node.op_type == "Gemm" and isinstance(inner, torch.nn.Linear):
            ties = [("weight", 1, not attrs.get("transB", 0), float(attrs.get("alpha", 1.0)))]
            if len(node.input) > 2 and node.input[2]:
                ties.append(("bias", 2, False, float(attrs.get("beta", 1.0))))
        elif node.op_type == "BatchNormalization" and isinstance(inner, torch.nn.modules.batchnorm._BatchNorm):
            ties = [(name, i, False, 1.0) for i, name in enumerate(("weight", "bias", "running_mean", "running_var"),
                                                                     start=1)]
        for attr, number, transpose, scale in ties:
            sources[f"{inner_prefix}.{attr}"] = ParameterSource(
                node.input[number], _array(getattr(inner, attr)), transpose=transpose, scale=scale,
                consumer=node.output[0], input_index=number)
    return sources


def to_torch(model: onnx.ModelProto) -> TorchBridge:
    """Convert ``model`` to an eval-mode ``torch.nn.Module`` tied back to its ONNX tensors.

    A graph fixed to one batch size is converted with its batch freed when the
    result keeps the images of a batch independent, else as it is (and then
    :func:`check_free_batch` refuses what needs larger batches).
    Raises :class:`BridgeError` naming the ops that cannot be converted.
    """
    bridge = _convert(model, free_batch=True)
    if any(step.startswith("freed") for step in bridge.steps) and bridge.image is not None:
        if batch_mixing(bridge, bridge.image) is not None:
            return _convert(model, free_batch=False)
    return bridge


def _convert(model: onnx.ModelProto, free_batch: bool) -> TorchBridge:
    from onnx2torch import convert

    prepared, steps = prepare_for_torch(model, free_batch)
    try:
        # onnx2torch sizes a model given in memory with ByteSize(): past 2 GiB it gets a file
        with in_one_piece(prepared) as source:
            module = convert(source, attach_onnx_mapping=True)
    except Exception as error:  # onnx2torch reports unsupported attributes as NotImplementedError etc.
        raise BridgeError(f"the PyTorch bridge (onnx2torch) failed: {error}") from error
    # onnx2torch names modules after nodes; the first output name identifies the node reliably
    by_output = {}
    for prefix, sub in module.named_modules():
        mapping = getattr(sub, "onnx_mapping", None)
        if mapping is not None and mapping.outputs:
            by_output[mapping.outputs[0]] = (prefix, sub)
    sources = _sources_by_node(prepared, by_output)
    layers = conv_layers(with_node_names(model))
    norms = batchnorm_after(prepared.graph, layers)     # value names survive the preparation
    conv_modules, channel_modules = {}, {}
    for layer in layers:
        if layer.output not in by_output:
            raise BridgeError(f"Conv {layer.name!r} was not converted to a PyTorch layer")
        conv_modules[layer.name] = channel_modules[layer.name] = by_output[layer.output][1]
        norm = norms.get(layer.name)
        if norm is not None and norm.output[0] in by_output:
            channel_modules[layer.name] = by_output[norm.output[0]][1]
    try:
        image = image_input(model)
    except UnsupportedModelError:
        image = None
    return TorchBridge(module=module.eval(), sources=sources, conv_modules=conv_modules, steps=steps,
                       channel_modules=channel_modules, image=image)


def write_back(original: onnx.ModelProto, bridge: TorchBridge) -> onnx.ModelProto:
    """A copy of ``original`` whose tensors hold the bridge module's current values.

    Nodes, names, opset and metadata are untouched; a tensor whose value did not
    change keeps its original bytes. Two exceptions, where one stored tensor fed
    several places that training has made differ: an Identity copy of a stored
    tensor becomes an initializer of its own (same name), and a tensor read
    directly by several nodes (exporters store equal tensors once, e.g. a fresh
    BatchNorm's bias and running mean) gets a new initializer ``NAME.k`` for each
    reader whose value now differs, that reader's input renamed to it.
    """
    updated = onnx.ModelProto()
    updated.CopyFrom(original)
    slots = constant_tensors(updated.graph)
    identities = _stored_identities(updated.graph)
    state = bridge.module.state_dict()
    # ONNX tensor -> (reader, its ONNX value now, whether training changed it)
    readers: dict[str, list[tuple[ParameterSource, np.ndarray, bool]]] = {}
    for key, source in bridge.sources.items():
        value = _array(state[key])
        changed = not (value.shape == source.original.shape and np.array_equal(value, source.original))
        readers.setdefault(source.tensor, []).append((source, source.to_onnx(value), changed))
    nodes = {node.output[0]: node for node in updated.graph.node if node.output}
    for tensor, users in readers.items():
        if not any(changed for _, _, changed in users):
            continue
        if tensor not in slots and tensor in identities:   # the copy gets its own values
            _materialize_identity(updated.graph, identities.pop(tensor))
            slots = constant_tensors(updated.graph)
        # other Identity copies of this tensor keep the values they had: give them their own first
        for name in [name for name, node in identities.items() if node.input[0] == tensor]:
            _materialize_identity(updated.graph, identities.pop(name))
            slots = constant_tensors(updated.graph)
        slot = slots.get(tensor)
        if slot is None:
            raise BridgeError(f"tensor {tensor!r} is not stored in the original graph")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(slot.data_type)
        first_value, first_changed = users[0][1].astype(dtype), users[0][2]
        for source, value, _ in users:
            value = value.astype(dtype)
            if tuple(value.shape) != tuple(slot.dims):
                raise BridgeError(f"{source.consumer}: shape {value.shape} does not match ONNX tensor "
                                  f"{tensor!r} {tuple(slot.dims)}")
            if np.array_equal(value, first_value):
                continue
            node = nodes.get(source.consumer)
            if node is None or node.input[source.input_index] != tensor:
                raise BridgeError(f"tensor {tensor!r} is shared and its readers now differ, but its reader "
                                  f"{source.consumer!r} is not a node of the original graph")
            own = numpy_helper.from_array(value, unique_name(updated.graph, tensor))
            updated.graph.initializer.append(own)
            if updated.ir_version < 4:     # IR 3 lists every initializer as a graph input too
                updated.graph.input.append(onnx.helper.make_tensor_value_info(own.name, slot.data_type, slot.dims))
            node.input[source.input_index] = own.name
        if first_changed:
            _store(slot, first_value)
    return updated


def _store(slot: onnx.TensorProto, value: np.ndarray) -> None:
    """Overwrite ``slot``'s values in place (inline raw data; the name and dims stay)."""
    replacement = numpy_helper.from_array(value, slot.name)
    slot.ClearField("float_data")
    slot.ClearField("double_data")
    slot.ClearField("int32_data")
    slot.ClearField("external_data")
    slot.data_location = onnx.TensorProto.DEFAULT
    slot.raw_data = replacement.raw_data


@contextlib.contextmanager
def channels_held_at_zero(modules: Mapping[str, torch.nn.Module], removed: Mapping[str, Sequence[int]]):
    """Within the block, the ``removed`` channels' outputs are multiplied by 0 in every forward pass."""
    handles = []
    try:
        for layer, channels in removed.items():
            if not channels:
                continue
            module = modules[layer]
            keep: dict[str, torch.Tensor] = {}

            def hook(_module, _inputs, output, channels=tuple(channels), keep=keep):
                key = f"{output.device}/{output.dtype}/{output.shape[1]}"
                if key not in keep:
                    mask = torch.ones(output.shape[1], dtype=output.dtype, device=output.device)
                    mask[list(channels)] = 0
                    keep[key] = mask.view(1, -1, *([1] * (output.dim() - 2)))
                return output * keep[key]

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
