"""What running a graph costs per image: FLOPs and activation memory, read off the graph.

Shapes come from ONNX shape inference with the image input fixed at batch 1 and
the given height and width, so the figures hold for models with free batch or
spatial dimensions too. FLOPs count the dense work only (Conv, Gemm, MatMul,
2 per multiply-add); element-wise nodes are memory-bound and left out. Memory
is the size of activation tensors, ignoring weights.

Used for two things: chunk sizes that fit a memory budget (``--max-memory``),
and the FLOP bound the speed benchmark compares a scan's time with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from fmt_audit.model.graph import image_input, node_names, shape_skeleton

_ELEMENT_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
                  onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT64: 8, onnx.TensorProto.INT32: 4,
                  onnx.TensorProto.BOOL: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1}


@dataclass(frozen=True)
class GraphCost:
    """Per-image costs of one graph at one input size."""

    names: tuple[str, ...]              # node names, in node order
    flops: tuple[int, ...]              # dense FLOPs of each node, per image
    ancestors: dict[str, int]           # node name -> bitmask of the node indices it depends on (itself excluded)
    peak_bytes: int                     # most activation bytes alive at once in a forward pass
    value_bytes: tuple[int, ...]        # bytes of each node's outputs

    @property
    def total_flops(self) -> int:
        return sum(self.flops)

    def flops_to(self, node: str) -> int:
        """FLOPs of a forward pass that stops after ``node``."""
        index = self.names.index(node)
        return self.flops[index] + sum(self.flops[i] for i in _bits(self.ancestors[node]))

    def retained_bytes(self, node: str) -> int:
        """Activation bytes a forward pass up to ``node`` keeps for its backward pass (an upper bound)."""
        index = self.names.index(node)
        return self.value_bytes[index] + sum(self.value_bytes[i] for i in _bits(self.ancestors[node]))


def _bits(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def graph_cost(model: onnx.ModelProto, height: int, width: int) -> GraphCost:
    """Per-image FLOPs and activation memory of ``model`` for ``height`` x ``width`` images."""
    fixed = shape_skeleton(model)
    image = image_input(model)
    for value in fixed.graph.input:
        if value.name == image.name:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, (1, *image.model_shape(image.channels or 3, height, width))):
                dim.Clear()
                dim.dim_value = size
    del fixed.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed).graph
    except Exception:  # a best effort: unknown shapes count as zero below
        inferred = fixed.graph
    shapes = {v.name: v.type.tensor_type for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    graph = model.graph
    initializers = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}

    def dims(name: str) -> tuple[int, ...] | None:
        if name in initializers:
            return initializers[name]
        kind = shapes.get(name)
        if kind is None or not kind.HasField("shape"):
            return None
        out = tuple(max(d.dim_value, 0) if d.HasField("dim_value") else 0 for d in kind.shape.dim)   # -1: unknown
        return out if all(out) else None

    def nbytes(name: str) -> int:
        shape = dims(name)
        kind = shapes.get(name)
        if shape is None or kind is None:
            return 0
        return int(np.prod(shape, dtype=np.int64)) * _ELEMENT_BYTES.get(kind.elem_type, 4)

    names = tuple(node_names(graph))
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    flops, value_bytes, ancestors = [], [], {}
    for i, node in enumerate(graph.node):
        flops.append(_node_flops(node, dims))
        value_bytes.append(sum(nbytes(out) for out in node.output if out))
        mask = 0    # an int bitmask: unions stay cheap on graphs of thousands of nodes
        for parent in {producer[name] for name in node.input if name in producer}:
            mask |= (1 << parent) | ancestors[names[parent]]
        ancestors[names[i]] = mask
    return GraphCost(names, tuple(flops), ancestors, _peak_live(graph, nbytes, image.name, initializers),
                     tuple(value_bytes))


def _node_flops(node: onnx.NodeProto, dims) -> int:
    if node.domain not in ("", "ai.onnx"):
        return 0
    if node.op_type == "Conv":
        weight, out = dims(node.input[1]), dims(node.output[0])
        if not weight or not out:
            return 0
        # per output element: in_channels/groups * kernel multiply-adds
        return 2 * int(np.prod(out[1:], dtype=np.int64)) * int(np.prod(weight[1:], dtype=np.int64))
    if node.op_type in ("Gemm", "MatMul"):
        a, out = dims(node.input[0]), dims(node.output[0])
        if not a or not out:
            return 0
        transposed = node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute)
        inner = a[-2] if transposed and len(a) >= 2 else a[-1]
        return 2 * int(np.prod(out[1:], dtype=np.int64)) * int(inner)
    return 0


def _peak_live(graph: onnx.GraphProto, nbytes, image: str, constants: Iterable[str]) -> int:
    """Most bytes alive at once (the image and node outputs), freeing each value after its last consumer."""
    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = i
    outputs = {value.name for value in graph.output}
    skip = set(constants)
    live = peak = nbytes(image)
    for i, node in enumerate(graph.node):
        for name in node.output:
            if name and name not in skip:
                live += nbytes(name)
        peak = max(peak, live)
        for name in set(node.input):
            if last_use.get(name) == i and name not in outputs and name not in skip:
                live -= nbytes(name)
    return peak


def scan_flops(cost: GraphCost, layers: Iterable[tuple[str, int, int]], samples: int, steps: int = 1) -> int:
    """The dense FLOPs gradient-mode testing cannot avoid, for ``(layer, out_channels, channels tested)``.

    Per layer: the clean and the random-start forward passes up to the layer.
    Per channel: ``steps - 1`` further forward passes to the layer, ``steps``
    backward passes to the input (input gradients only: about one forward pass
    to the layer, with the layer's own share for one channel), and two full
    forward passes for the candidates.
    """
    total = 0
    for layer, out_channels, tested in layers:
        forward = cost.flops_to(layer)
        own = cost.flops[cost.names.index(layer)]
        backward = forward - own + own // max(out_channels, 1)
        total += 2 * forward + tested * ((steps - 1) * forward + steps * backward + 2 * cost.total_flops)
    return total * samples


# Measured and assumed overheads: torch keeps about what the ONNX values hold for a
# backward pass, doubled for its own temporaries; ORT's arena about doubles a run's peak;
# a candidate batch lives as a torch tensor, its preprocessed copy and ORT's input.
_RETAINED_FACTOR = 2
_RUN_FACTOR = 2
_CANDIDATE_COPIES = 3
# Largest batches worth running: on a CPU, batches beyond a few hundred images ran no
# faster (ONNX Runtime) or slower (torch: 2.3x slower at 2,000 than at 200 images)
PREDICT_BATCH_CAP = {"cpu": 256, "cuda": 2048}
CANDIDATE_CAP = 4096


@dataclass(frozen=True)
class MemoryPlan:
    """Batch sizes for a scan that keep its working memory under ``budget_mib``."""

    budget_mib: float
    predict_batch: int      # images per inference call (ONNX Runtime or torch)
    candidate_batch: int    # candidate images gathered before they are predicted (x 2 N per channel)
    gradient_batch: int     # images whose forward pass is kept for backward passes at once

    def to_dict(self) -> dict:
        return {"budget_mib": round(self.budget_mib, 3), "predict_batch": self.predict_batch,
                "candidate_batch": self.candidate_batch, "gradient_batch": self.gradient_batch}


def plan_memory(cost: GraphCost, layers: Iterable[str], samples: int, image_bytes: int, budget_bytes: float,
                device: str = "cpu") -> MemoryPlan:
    """Batch sizes under ``budget_bytes``: 40% for the kept forward pass (mask mode keeps none: there it
    holds one layer's cached feature maps for the cut graph, ``fmt_audit.fmt.scan.CUT_SHARE``), 30% each for
    candidates and runs.

    Below what one channel needs (its 2 x ``samples`` candidates), batches stay
    at that minimum: the budget is a target, not a hard limit.
    """
    retained = max((cost.retained_bytes(name) for name in layers), default=0) * _RETAINED_FACTOR
    gradient_batch = samples if retained == 0 else int(min(samples, max(1, 0.4 * budget_bytes // retained)))
    per_run = max(cost.peak_bytes * _RUN_FACTOR, 1)
    predict_batch = int(min(PREDICT_BATCH_CAP.get(device, 256), max(1, 0.3 * budget_bytes // per_run)))
    if predict_batch >= samples:   # whole candidate batches per call: few distinct batch shapes, and torch
        predict_batch -= predict_batch % samples   # prepares its kernels once per shape (2x slower otherwise)
    candidates = int(0.3 * budget_bytes // max(image_bytes * _CANDIDATE_COPIES, 1))
    candidate_batch = max(2 * samples, min(CANDIDATE_CAP, candidates))
    return MemoryPlan(budget_bytes / 2**20, predict_batch, candidate_batch, gradient_batch)


def available_memory(device: str) -> int:
    """Bytes free for a scan's working memory on ``device`` (``cpu`` or ``cuda``) right now."""
    if device == "cuda":
        import torch

        if torch.cuda.is_available():   # else ORT alone runs on the GPU: plan by host memory
            free, _total = torch.cuda.mem_get_info()
            return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mib() -> dict:
    """Peak resident memory of this process, and torch's peak CUDA allocation if CUDA was used."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mib": round(rss / (2**20 if sys.platform == "darwin" else 1024), 1)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
