"""Instrumentation: a per-channel mask after every Conv, and every feature map exposed.

For each Conv layer named ``L`` (its ONNX node name, see :mod:`fmt_audit.model.graph`):

* the Conv's output is renamed ``fmt_feature/L`` and exposed as an extra graph
  output: the feature map before the mask;
* a ``Mul`` named ``fmt_mask_mul/L`` multiplies it by a new graph input
  ``fmt_mask/L`` of shape ``[mask_batch, C, 1, 1]`` and writes the Conv's
  original output name, so every consumer and graph output is unchanged.

Masks are graph inputs, not initializers, so one ONNX Runtime session serves
every mask setting: all ones reproduces the original model, a 0 at channel c
silences that channel downstream, and a leading dimension equal to the batch
gives each image its own mask (many mask settings in one run). Pass
``mask_batch=1`` shapes to share one mask across the batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

from fmt_audit.model.graph import FLOAT_TYPES, conv_layers, with_node_names

# bfloat16 has no numpy dtype; such models get float32 masks (ORT then rejects them clearly)
NUMPY_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}

MASK_PREFIX = "fmt_mask/"
FEATURE_PREFIX = "fmt_feature/"
MUL_PREFIX = "fmt_mask_mul/"


def mask_input_name(layer: str) -> str:
    """Graph input holding the channel mask of Conv layer ``layer``."""
    return MASK_PREFIX + layer


def feature_output_name(layer: str) -> str:
    """Graph output exposing the (unmasked) feature map of Conv layer ``layer``."""
    return FEATURE_PREFIX + layer


def instrument(model: onnx.ModelProto, layers: Iterable[str] | None = None) -> onnx.ModelProto:
    """Return a copy of ``model`` with a mask input and a feature output for each Conv.

    ``layers`` restricts instrumentation to those Conv node names (default: all).
    Unnamed nodes get their stable generated names in the copy.
    """
    import onnx_graphsurgeon as gs

    named = with_node_names(model)
    wanted = None if layers is None else set(layers)
    convs = {layer.name: layer for layer in conv_layers(named) if wanted is None or layer.name in wanted}
    if wanted is not None and (unknown := wanted - convs.keys()):
        raise ValueError(f"not Conv layers of this model: {sorted(unknown)}")

    graph = gs.import_onnx(named)
    input_type = named.graph.input[0].type.tensor_type.elem_type
    default_dtype = np.dtype(FLOAT_TYPES.get(input_type, "float32") if input_type in NUMPY_FLOATS else "float32")
    for node in list(graph.nodes):
        if node.op != "Conv" or node.name not in convs:
            continue
        layer = convs[node.name]
        original_output = node.outputs[0]
        dtype = original_output.dtype or default_dtype
        # graph outputs need a shape; unknown sizes stay unknown (None)
        shape = original_output.shape or [None, layer.out_channels, None, None]
        feature = gs.Variable(feature_output_name(layer.name), dtype=dtype, shape=shape)
        mask = gs.Variable(mask_input_name(layer.name), dtype=dtype, shape=["mask_batch", layer.out_channels, 1, 1])
        node.outputs[0] = feature
        graph.nodes.append(gs.Node("Mul", name=MUL_PREFIX + layer.name, inputs=[feature, mask],
                                   outputs=[original_output]))
        graph.inputs.append(mask)
        graph.outputs.append(feature)
    graph.toposort()
    instrumented = gs.export_onnx(graph)
    # graphsurgeon rebuilds the ModelProto; keep the original's identity fields
    instrumented.ir_version = named.ir_version
    del instrumented.opset_import[:]
    instrumented.opset_import.extend(named.opset_import)
    instrumented.producer_name = named.producer_name
    instrumented.producer_version = named.producer_version
    return instrumented
