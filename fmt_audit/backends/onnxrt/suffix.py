"""One Conv layer's part of an instrumented graph: run what comes before its mask once, the rest per setting.

Everything upstream of a layer's mask is the same whatever the mask says, so testing a channel needs only
the part of the graph the mask can change (its *suffix*). :class:`LayerSuffix` cuts the instrumented graph
(:mod:`fmt_audit.backends.onnxrt.instrument`) of a :class:`~fmt_audit.backends.onnxrt.masked.MaskedModel`
in two at one layer's mask:

* the *prefix*: every node the suffix needs that does not depend on the mask, run once on the images;
  its results that the suffix reads (the *boundary*: the layer's feature map, and in a residual network the
  shortcut beside it) are kept;
* the *suffix*: the mask's ``Mul`` and every node downstream of it, fed the boundary repeated once per
  mask setting.

The boundary holds only floating-point tensors computed from the images, which carry the batch first;
anything else a suffix node reads (a shape computed from a tensor, a constant computed from weights) is
computed in the suffix, so a ``Reshape`` to ``[batch, -1]`` sees the batch it runs on. Before it is used, a
cut must give the whole graph's class scores on two copies of the first batch, as they are fed when testing
(:meth:`~fmt_audit.backends.onnxrt.masked.MaskedModel.replicated_predictions`); where it does not, or the
graph cannot be cut or run, the whole graph runs.
"""

from __future__ import annotations

import numpy as np
import onnx

from fmt_audit.backends.onnxrt.instrument import MASK_PREFIX, MUL_PREFIX, mask_input_name
from fmt_audit.backends.onnxrt.session import Session, create_session
from fmt_audit.errors import FmtAuditError
from fmt_audit.model.graph import class_scores

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


class CutError(FmtAuditError):
    """The graph cannot be cut at this layer (the caller runs the whole graph instead)."""


class LayerSuffix:
    """The prefix and suffix sessions of one layer of ``instrumented`` (a graph with a mask per Conv)."""

    @staticmethod
    def typed_graph(instrumented: onnx.ModelProto):
        """``instrumented`` as an onnx-graphsurgeon graph with the element types shape inference gives its
        tensors (the cut tells floating-point tensors from shapes and indices by them); every layer's cut
        copies it."""
        import onnx_graphsurgeon as gs

        return gs.import_onnx(_with_types(instrumented))

    def __init__(self, graph, instrumented: onnx.ModelProto, layer: str, image_name: str, logits_name: str,
                 device: str = "auto", threads: int | None = None):
        self.layer = layer
        mul = next((node for node in graph.nodes if node.name == MUL_PREFIX + layer), None)
        if mul is None:
            raise CutError(f"no mask after layer {layer}")
        tensors = graph.tensors()
        if logits_name not in tensors:
            raise CutError(f"no tensor {logits_name}")
        needed = _ancestors(tensors[logits_name])
        suffix = [node for node in _descendants(mul) if id(node) in needed]
        if not suffix:
            raise CutError(f"the class scores do not depend on layer {layer}")
        chosen = {id(node) for node in suffix}
        image_dependent = _descendants_of_tensor(tensors[image_name])
        boundary = _boundary(suffix, chosen, image_dependent)
        self.boundary = [tensor.name for tensor in boundary]
        # the prefix: what the boundary needs, from the image and the masks of the layers before this one
        prefix = graph.copy()
        copied = prefix.tensors()
        prefix.outputs = [copied[name] for name in self.boundary if not _is_graph_input(copied[name], prefix)]
        self.computed = [tensor.name for tensor in prefix.outputs]
        prefix.cleanup(remove_unused_graph_inputs=True).toposort()
        self.prefix: Session | None = create_session(_export(prefix, instrumented), device, threads, quiet=True) \
            if self.computed else None
        # the suffix: the boundary (and any graph input it reads directly) in, the class scores out
        part = graph.copy()
        kept = part.tensors()
        part.nodes = [node for node in part.nodes if node.name in {n.name for n in suffix}]
        inputs = [kept[name] for name in self.boundary]
        inputs += [t for t in part.inputs if t.name not in self.boundary and _read_by(t, part.nodes)]
        for tensor in inputs:
            tensor.inputs.clear()           # no producer: a graph input now
        part.inputs = inputs
        part.outputs = [kept[logits_name]]
        part.cleanup(remove_unused_graph_inputs=True).toposort()
        self.suffix: Session = create_session(_export(part, instrumented), device, threads, quiet=True)
        self.mask_name = mask_input_name(layer)
        self.image_name = image_name
        self.logits_name = logits_name

    def boundary_values(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The boundary tensors for one batch: the prefix run on ``feeds`` (the whole graph's inputs)."""
        values = {name: feeds[name] for name in self.boundary if name in feeds}
        if self.prefix is not None:
            wanted = {name: value for name, value in feeds.items() if name in self.prefix.input_names}
            values.update(zip(self.computed, self.prefix.run(wanted, self.computed)))
        batch = len(feeds[self.image_name])
        for name, value in values.items():
            if value.ndim == 0 or value.shape[0] != batch:
                raise CutError(f"{name} does not carry the batch first (shape {list(value.shape)})")
        return values

    def scores(self, boundary: dict[str, np.ndarray], feeds: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
        """Class scores of the rows whose ``boundary`` values are given, row k with row k of ``mask`` as the
        layer's mask; ``feeds``: the other graph inputs (the masks of the later layers, at one)."""
        run = dict(boundary)
        for name in self.suffix.input_names:
            if name == self.mask_name:
                run[name] = mask
            elif name not in run:
                run[name] = feeds[name]
        return class_scores(self.suffix.run(run, [self.logits_name])[0])


def _with_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the element types shape inference can give its intermediate tensors (the cut needs
    to tell floating-point tensors from shapes and indices)."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:   # an op inference cannot handle: tensors without a type stay untyped
        return model


def _ancestors(tensor) -> set[int]:
    """ids of the nodes ``tensor`` depends on."""
    seen: set[int] = set()
    stack = list(tensor.inputs)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(producer for t in node.inputs for producer in t.inputs)
    return seen


def _descendants(node) -> list:
    """``node`` and every node downstream of it, in no particular order."""
    seen: dict[int, object] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen[id(current)] = current
        stack.extend(consumer for t in current.outputs for consumer in t.outputs)
    return list(seen.values())


def _descendants_of_tensor(tensor) -> set[int]:
    """ids of the nodes that depend on ``tensor``."""
    return {id(node) for first in tensor.outputs for node in _descendants(first)}


def _boundary(suffix: list, chosen: set[int], image_dependent: set[int]) -> list:
    """The tensors the suffix reads that it does not compute (growing ``suffix`` and ``chosen`` with the
    producers of anything that cannot be computed once for all mask settings), in a stable order."""
    import onnx_graphsurgeon as gs

    while True:
        pulled = False
        boundary: dict[str, object] = {}
        for node in list(suffix):
            for tensor in node.inputs:
                if isinstance(tensor, gs.Constant) or not tensor.name or tensor.name in boundary:
                    continue
                producer = tensor.inputs[0] if tensor.inputs else None
                if producer is not None and id(producer) in chosen:
                    continue
                keep = producer is None or (id(producer) in image_dependent and _is_float(tensor))
                if keep:
                    boundary[tensor.name] = tensor
                    continue
                suffix.append(producer)         # a shape, an index, a constant: computed in the suffix
                chosen.add(id(producer))
                pulled = True
        if not pulled:
            return [boundary[name] for name in sorted(boundary) if not name.startswith(MASK_PREFIX)]


def _is_float(tensor) -> bool:
    try:
        return tensor.dtype is not None and np.dtype(tensor.dtype).type in FLOAT_DTYPES
    except TypeError:
        return False


def _is_graph_input(tensor, graph) -> bool:
    return any(tensor is t for t in graph.inputs)


def _read_by(tensor, nodes: list) -> bool:
    return any(tensor is t for node in nodes for t in node.inputs)


def _export(graph, like: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    model = gs.export_onnx(graph)
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    for value in (*model.graph.input, *model.graph.output):
        if not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"     # the suffix runs many copies of the batch at once
    return model
