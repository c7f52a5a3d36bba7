"""What a model is, in a form a person or a pipeline can read (``fmt-audit inspect``).

Uses only onnx: no torch import, so it answers in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from fmt_audit.backends.torch.ops import unsupported_ops
from fmt_audit.backends.torch.padding import UNKNOWN_SIZE, padding_problems
from fmt_audit.model.graph import ConvLayer, ImageInput, TensorSpec, constant_tensors, graph_outputs, nonfinite_weights
from fmt_audit.model.loading import LoadedModel


@dataclass(frozen=True)
class ModelSummary:
    path: str
    sha256: str
    ir_version: int
    opsets: dict[str, int]
    producer: str
    image_input: ImageInput
    outputs: list[TensorSpec]
    class_output: str
    num_classes: int | None
    layers: list[ConvLayer]
    batchnorm_nodes: int
    parameters: int
    op_counts: dict[str, int]
    bridge_unsupported: list[str]
    external_data: list[str]
    nonfinite_weights: list[str]

    @property
    def computed_weights(self) -> list[str]:
        """Conv layers whose weights other nodes compute (ConstantOfShape, DequantizeLinear, ...): not counted
        in ``parameters``, and not trainable by the PyTorch bridge."""
        return [layer.name for layer in self.layers if not layer.weight_stored]

    @property
    def conv_channels(self) -> int:
        return sum(layer.out_channels for layer in self.layers)

    def to_dict(self) -> dict:
        return {
            "path": self.path, "sha256": self.sha256, "ir_version": self.ir_version, "opsets": self.opsets,
            "producer": self.producer, "image_input": self.image_input.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs], "class_output": self.class_output,
            "num_classes": self.num_classes,
            "conv": {
                "layers": len(self.layers), "channels": self.conv_channels,
                "grouped": sum(layer.grouped and not layer.depthwise for layer in self.layers),
                "depthwise": sum(layer.depthwise for layer in self.layers),
                "one_by_one_maps": sum(layer.one_by_one for layer in self.layers),
                "details": [layer.to_dict() for layer in self.layers],
            },
            "batchnorm": {"nodes": self.batchnorm_nodes, "folded": self.batchnorm_nodes == 0},
            "parameters": self.parameters, "computed_weights": self.computed_weights, "op_counts": self.op_counts,
            "bridge_unsupported_ops": self.bridge_unsupported, "external_data": self.external_data,
            "nonfinite_weights": self.nonfinite_weights,
        }

    def _bridge_text(self) -> str:
        problems = self.bridge_unsupported
        if not problems:
            return "all ops convert to PyTorch"
        if all(UNKNOWN_SIZE in problem for problem in problems):
            return (f"converts at the size of the images given ({len(problems)} strided SAME padding(s) over a free "
                    "height or width)")
        return ("cannot convert: " + ", ".join(problems[:3])
                + (f" and {len(problems) - 3} more" if len(problems) > 3 else ""))

    def format_text(self, verbose: bool = False) -> str:
        d = self.to_dict()
        conv = d["conv"]
        notes = []
        if conv["grouped"]:
            notes.append(f"{conv['grouped']} grouped")
        if conv["depthwise"]:
            notes.append(f"{conv['depthwise']} depthwise")
        if conv["one_by_one_maps"]:
            notes.append(f"{conv['one_by_one_maps']} with 1x1 output maps")
        opsets = ", ".join(f"{domain or 'ai.onnx'} {version}" for domain, version in self.opsets.items())
        lines = [
            f"model        {self.path}",
            f"sha256       {self.sha256}",
            f"opset        {opsets} (IR {self.ir_version})",
            f"producer     {self.producer or '(none)'}",
            f"image input  {self.image_input.name} {self.image_input.shape_text()} {self.image_input.dtype}"
            + (f" ({self.image_input.layout}: transposed to NCHW in the graph)"
               if self.image_input.layout != "NCHW" else ""),
            "outputs      " + ", ".join(
                f"{o.name} {o.shape_text()} {o.dtype}" for o in self.outputs),
            f"classes      {self.num_classes if self.num_classes is not None else 'unknown'}"
            + (f" (scores: output {self.class_output}, of {len(self.outputs)})" if len(self.outputs) > 1 else ""),
            f"conv layers  {conv['layers']}, {conv['channels']} output channels"
            + (f" ({', '.join(notes)})" if notes else ""),
            "batchnorm    " + ("folded (no BatchNormalization nodes)" if self.batchnorm_nodes == 0
                               else f"{self.batchnorm_nodes} BatchNormalization nodes remain"),
            f"parameters   {self.parameters:,} stored"
            + (f"; {len(self.computed_weights)} Conv layer(s) compute their weights from other nodes "
               f"({', '.join(self.computed_weights[:3])}{', ...' if len(self.computed_weights) > 3 else ''}): "
               "not counted" if self.computed_weights else ""),
            "bridge       " + self._bridge_text(),
        ]
        if self.external_data:
            lines.append(f"external     {', '.join(self.external_data)}")
        if self.nonfinite_weights:
            lines.append(f"warning      NaN or Inf in weights: {', '.join(self.nonfinite_weights[:5])}"
                         + (f" and {len(self.nonfinite_weights) - 5} more" if len(self.nonfinite_weights) > 5 else ""))
        if verbose:
            lines.append("")
            lines.append(f"{'layer':40s} {'out':>5s} {'in':>5s} {'kernel':>7s} {'stride':>7s} {'groups':>6s} "
                         f"{'map':>7s}")
            for layer in self.layers:
                kernel = "x".join(map(str, layer.kernel))
                stride = "x".join(map(str, layer.strides))
                size = "x".join(map(str, layer.feature_map)) if layer.feature_map else "?"
                tag = " depthwise" if layer.depthwise else ""
                lines.append(f"{layer.name:40s} {layer.out_channels:5d} {layer.in_channels or 0:5d} "
                             f"{kernel:>7s} {stride:>7s} {layer.groups:6d} {size:>7s}{tag}")
        return "\n".join(lines)


def bridge_problems(model: LoadedModel) -> list[str]:
    """What keeps the PyTorch bridge (gradient mode, the verdict, repair) from this model: ops onnx2torch lacks,
    padding it cannot take, Conv weights computed by other nodes."""
    return (unsupported_ops(model.classifier) + padding_problems(model.classifier)
            + [f"{layer.name}: weights computed by other nodes" for layer in model.layers if not layer.weight_stored])


def summarize(model: LoadedModel) -> ModelSummary:
    proto = model.proto
    graph = proto.graph
    op_counts: dict[str, int] = {}
    for node in graph.node:
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16}
    parameters = sum(int(np.prod(t.dims)) for t in constant_tensors(graph).values() if t.data_type in float_types)
    producer = " ".join(part for part in (proto.producer_name, proto.producer_version) if part)
    return ModelSummary(
        path=str(model.path), sha256=model.sha256, ir_version=proto.ir_version,
        opsets={entry.domain: entry.version for entry in proto.opset_import},
        producer=producer, image_input=model.image_input, outputs=graph_outputs(proto), class_output=model.scores,
        num_classes=model.num_classes, layers=list(model.layers),
        batchnorm_nodes=op_counts.get("BatchNormalization", 0), parameters=parameters,
        op_counts=dict(sorted(op_counts.items())), bridge_unsupported=bridge_problems(model),
        external_data=list(model.external_data), nonfinite_weights=nonfinite_weights(graph),
    )
