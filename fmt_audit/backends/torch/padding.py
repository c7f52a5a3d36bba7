"""``auto_pad`` written as explicit ``pads`` (no torch here: ``inspect`` asks the same question).

TensorFlow-era and CNTK exports write ``auto_pad="SAME_UPPER"`` (or ``SAME_LOWER``/``VALID``) on Conv and
pooling nodes; onnx2torch refuses ``SAME_*``. ONNX defines the padding exactly: along each spatial axis of
size ``n``, stride ``s``, kernel ``k``, dilation ``d``, the total is
``max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)``, the odd pixel at the end (UPPER) or the start
(LOWER). With stride 1 the total is ``(k - 1) * d`` whatever the size; otherwise the input size must be known.
Only the bridge's copy is rewritten: the repaired graph keeps the original's attributes.
"""

from __future__ import annotations

import math

import onnx

from fmt_audit.model.graph import attribute, constant_tensors, inferred_shapes, node_names

POOLING_AND_CONV = ("Conv", "MaxPool", "AveragePool", "LpPool")
UNKNOWN_SIZE = "over an input of unknown size"     # the one padding problem that a known image size lifts


def _kernel(node: onnx.NodeProto, stored: dict[str, onnx.TensorProto],
            shapes: dict[str, tuple | None]) -> list[int] | None:
    kernel = attribute(node, "kernel_shape", None)
    if kernel:
        return [int(k) for k in kernel]
    if node.op_type == "Conv" and len(node.input) > 1:
        dims = tuple(stored[node.input[1]].dims) if node.input[1] in stored else shapes.get(node.input[1])
        if dims and len(dims) > 2 and all(isinstance(d, int) and d > 0 for d in dims[2:]):
            return [int(d) for d in dims[2:]]
    return None


def _pads(mode: str, sizes: list, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int] | None:
    """ONNX's explicit pads ``[begin..., end...]`` for ``mode``; None when an input size it needs is unknown."""
    begins, ends = [], []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        if mode == "VALID":
            total = 0
        elif s == 1:
            total = (k - 1) * d
        elif isinstance(n, int) and n > 0:
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        else:
            return None
        small, large = total // 2, total - total // 2
        begins.append(small if mode != "SAME_LOWER" else large)
        ends.append(large if mode != "SAME_LOWER" else small)
    return begins + ends


def explicit_pads(model: onnx.ModelProto) -> tuple[int, list[str]]:
    """Rewrite ``auto_pad`` on Conv and pooling nodes of ``model`` (in place) as explicit ``pads``.

    Returns how many nodes were rewritten and, for those that cannot be (a strided ``SAME_*`` over an input
    whose size is unknown), ``"<node>: <why>"``; those keep their ``auto_pad``.
    """
    graph = model.graph
    candidates = [(node, name) for node, name in zip(graph.node, node_names(graph))
                  if node.op_type in POOLING_AND_CONV and node.domain in ("", "ai.onnx")
                  and attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")]
    if not candidates:
        return 0, []
    stored = constant_tensors(graph)
    shapes = inferred_shapes(model)
    rewritten, problems = 0, []
    for node, name in candidates:
        mode = attribute(node, "auto_pad", b"NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("SAME_UPPER", "SAME_LOWER", "VALID"):
            problems.append(f"{name}: auto_pad {mode!r} is not an ONNX value (expected SAME_UPPER, SAME_LOWER, VALID "
                            "or NOTSET)")
            continue
        kernel = _kernel(node, stored, shapes)
        if kernel is None:
            problems.append(f"{name}: auto_pad {mode} with an unknown kernel size")
            continue
        rank = len(kernel)
        strides = [int(s) for s in attribute(node, "strides", [1] * rank)]
        dilations = [int(d) for d in attribute(node, "dilations", [1] * rank)]
        shape = shapes.get(node.input[0])
        sizes = list(shape[2:]) if shape and len(shape) == rank + 2 else [None] * rank
        pads = _pads(mode, sizes, kernel, strides, dilations)
        if pads is None:
            problems.append(f"{name}: auto_pad {mode} at stride {strides} {UNKNOWN_SIZE} (converts once run at "
                            "a fixed size: scan, repair and the verdict run at the size of the --data images)")
            continue
        if node.op_type == "AveragePool" and pads[:rank] != pads[rank:]:
            problems.append(f"{name}: auto_pad {mode} pads unevenly ({pads}), which onnx2torch's AveragePool "
                            "cannot do")
            continue
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(onnx.helper.make_attribute("pads", pads))
        rewritten += 1
    return rewritten, problems


def padding_problems(model: onnx.ModelProto) -> list[str]:
    """What :func:`explicit_pads` could not rewrite in ``model`` (left unchanged)."""
    if not any(a.name == "auto_pad" for node in model.graph.node for a in node.attribute):
        return []       # nothing to rewrite: no copy of the weights
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return explicit_pads(copy)[1]
