"""The channels two other published defenses prune, for ``repair --method fp|clp``.

* **Fine-Pruning** (Liu et al., RAID 2018): backdoor channels lie dormant on
  clean inputs. The last Conv layer's channels are pruned in increasing order of
  their mean activation on clean data until clean accuracy has dropped by a set
  amount; fine-tuning follows (in :mod:`fmt_audit.repair.pipeline`).
* **Channel Lipschitzness-based Pruning** (CLP, Zheng et al., ECCV 2022),
  data-free: a channel's upper bound on its Lipschitz constant is the largest
  singular value of its kernel, times the following BatchNormalization's
  ``|gamma| / sqrt(var + eps)`` where the norm is not folded into the Conv.
  Trigger channels are unusually sensitive: those above ``mean + u * std`` of
  their layer are pruned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from fmt_audit.backends.torch.bridge import BridgedClassifier, channels_held_at_zero
from fmt_audit.data import Dataset
from fmt_audit.errors import UnsupportedModelError
from fmt_audit.model.graph import ConvLayer, batchnorm_after, constant_tensors, last_conv_layers

# Fine-Pruning measures accuracy at most this many times while pruning (every
# ceil(C / 64) channels), on at most this many of the defender's images
FP_PROBES = 64
FP_IMAGES = 1024


@dataclass(frozen=True)
class PruningChoice:
    """The channels a pruning criterion chose, and the evidence it chose them on (for the report)."""

    channels: dict[str, list[int]]
    evidence: dict


def lipschitz_bounds(model: onnx.ModelProto, layers: Sequence[ConvLayer]) -> dict[str, np.ndarray]:
    """Per Conv layer with a stored weight, each output channel's upper bound on its Lipschitz constant.

    The bound is the spectral norm of the channel's kernel seen as a ``[C_in/groups, kh*kw]``
    matrix, scaled by a directly following BatchNormalization (as CLP defines it).
    """
    stored = constant_tensors(model.graph)
    norms = batchnorm_after(model.graph, layers)
    bounds = {}
    for layer in layers:
        if layer.weight not in stored:
            continue
        weight = numpy_helper.to_array(stored[layer.weight]).astype(np.float64)
        matrices = weight.reshape(weight.shape[0], weight.shape[1], -1)
        bound = np.linalg.svd(matrices, compute_uv=False)[:, 0]
        norm = norms.get(layer.name)
        if norm is not None:
            bound = bound * _batchnorm_scale(norm, stored, layer.out_channels)
        bounds[layer.name] = bound
    return bounds


def _batchnorm_scale(node: onnx.NodeProto, stored: dict[str, onnx.TensorProto], channels: int) -> np.ndarray:
    """``|gamma| / sqrt(var + epsilon)`` of a BatchNormalization node (ones where its tensors are computed)."""
    scale_name, variance_name = node.input[1], node.input[4]
    if scale_name not in stored or variance_name not in stored:
        return np.ones(channels)
    epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    gamma = numpy_helper.to_array(stored[scale_name]).astype(np.float64)
    variance = numpy_helper.to_array(stored[variance_name]).astype(np.float64)
    return np.abs(gamma) / np.sqrt(variance + epsilon)


def clp_channels(model: onnx.ModelProto, layers: Sequence[ConvLayer], u: float = 3.0) -> PruningChoice:
    """CLP: in each layer, the channels whose Lipschitz bound exceeds ``mean + u * std`` of the layer's bounds."""
    bounds = lipschitz_bounds(model, layers)
    if not bounds:
        raise UnsupportedModelError("CLP needs stored Conv weights; every Conv weight of this model is computed")
    channels, evidence = {}, {"u": u, "layers": {}, "skipped_computed_weights": [
        layer.name for layer in layers if layer.name not in bounds]}
    for name, bound in bounds.items():
        threshold = float(bound.mean() + u * bound.std())
        over = np.flatnonzero(bound > threshold).tolist()
        if over:
            channels[name] = over
        evidence["layers"][name] = {"mean": round(float(bound.mean()), 6), "std": round(float(bound.std()), 6),
                                    "threshold": round(threshold, 6), "max": round(float(bound.max()), 6)}
    return PruningChoice(channels, evidence)


def mean_activations(classifier: BridgedClassifier, layers: Sequence[str], data: Dataset,
                     batch_size: int = 256) -> np.ndarray:
    """Per channel, the mean of ``max(0, sum of the layers' outputs)`` over ``data``'s images and positions:
    how active the channel is on clean inputs. Each layer's output is taken after its BatchNormalization, if
    one follows; layers whose outputs are added (a residual block's Conv and shortcut) are measured as one."""
    modules = [classifier.bridge.channel_modules[name] for name in layers]
    outputs: list[torch.Tensor] = []
    per_batch: list[torch.Tensor] = []

    def record(_module, _inputs, output):
        outputs.append(output.detach().float())
        if len(outputs) == len(modules):
            positive = torch.stack(outputs).sum(0).clamp(min=0)
            per_batch.append(positive.mean(dim=tuple(range(2, positive.dim()))).sum(0).cpu())
            outputs.clear()

    handles = [module.register_forward_hook(record) for module in modules]
    try:
        classifier.logits(data.x, batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return (torch.stack(per_batch).sum(0) / len(data)).double().numpy()


def fine_pruning_layers(classifier: BridgedClassifier, model: onnx.ModelProto, layers: Sequence[ConvLayer],
                        image: np.ndarray) -> list[ConvLayer]:
    """The last Conv layer in node order, joined by the other last layers whose outputs have its shape
    (they are summed into the same feature map, so a channel is pruned in all of them)."""
    final = last_conv_layers(model, layers)
    shapes: dict[str, tuple[int, ...]] = {}

    def hook_for(name):
        def record(_module, _inputs, output):   # returns None: the output is left as it is
            shapes[name] = tuple(output.shape[1:])
        return record

    handles = [classifier.bridge.channel_modules[layer.name].register_forward_hook(hook_for(layer.name))
               for layer in final]
    try:
        classifier.logits(image[:1])
    finally:
        for handle in handles:
            handle.remove()
    last = final[-1]
    return [layer for layer in final if shapes.get(layer.name) == shapes.get(last.name)]


def dormant_channels(classifier: BridgedClassifier, model: onnx.ModelProto, layers: Sequence[ConvLayer],
                     data: Dataset, max_drop: float, seed: int = 0) -> PruningChoice:
    """Fine-Pruning: the last Conv layer's channels in increasing order of mean activation on ``data``, as many
    as can go before accuracy on ``data`` falls more than ``max_drop`` below the unpruned model's."""
    probe = data.take(FP_IMAGES, seed=seed)
    group = fine_pruning_layers(classifier, model, layers, probe.x)
    names = [layer.name for layer in group]
    activation = mean_activations(classifier, names, probe)
    order = np.argsort(activation, kind="stable")
    width = group[0].out_channels
    step = -(-width // FP_PROBES)
    base = classifier.accuracy(probe)
    kept, trace = 0, []
    modules = classifier.bridge.channel_modules
    for count in range(step, width, step):   # never the whole layer: that disconnects the network
        with channels_held_at_zero(modules, {name: order[:count].tolist() for name in names}):
            accuracy = classifier.accuracy(probe)
        trace.append({"pruned": count, "accuracy": round(accuracy, 6)})
        if accuracy < base - max_drop:
            break
        kept = count
    channels = sorted(order[:kept].tolist())
    return PruningChoice({name: channels for name in names} if channels else {}, {
        "layers": names, "max_drop": max_drop, "images": len(probe), "accuracy_unpruned": round(base, 6),
        "mean_activation": [round(float(a), 6) for a in activation], "trace": trace})
