"""A classifier's logits as the class-level tests of the verdict (:mod:`fmt_audit.verdict.evidence`) need them.

Both tests compare classes by logit margins, so a final Softmax is taken off (margins of probabilities
saturate at 1), a hidden one undone, and the class count read from a forward pass (the graph's declared
output shape may be symbolic).
"""

from __future__ import annotations

import onnx
import torch

from fmt_audit.backends.torch.bridge import BridgedClassifier, TorchBridge, check_free_batch, to_torch, torch_device
from fmt_audit.data import Preprocessing
from fmt_audit.errors import ConfigError
from fmt_audit.model.graph import ImageInput


def without_final_softmax(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """The model with a Softmax that produces its first output removed (margins of probabilities saturate
    at 1; the Softmax's input gives the same class order and the logit margins), and whether it had one.
    The model is copied only when it changes."""
    graph = model.graph
    output = graph.output[0].name
    producer = next((node for node in graph.node if output in node.output), None)
    if producer is None or producer.op_type != "Softmax" or producer.domain not in ("", "ai.onnx"):
        return model, False
    readers = [node for node in graph.node if output in node.input]
    if readers or sum(o.name == output for o in graph.output) > 1:
        return model, False
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    nodes = [node for node in stripped.graph.node if output not in node.output]
    del stripped.graph.node[:]
    stripped.graph.node.extend(nodes)
    stripped.graph.output[0].name = producer.input[0]
    return stripped, True


def as_logits(output: torch.Tensor) -> torch.Tensor:
    """The model's first output as ``[N, classes]``; probabilities (rows of non-negative values summing to
    1, a Softmax the graph hides behind other ops) as their logarithm, whose differences are the logits'."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    output = output.flatten(1)
    with torch.no_grad():
        probabilities = bool((output >= 0).all()) and bool(torch.allclose(output.sum(1), torch.ones(
            len(output), device=output.device, dtype=output.dtype), atol=1e-4))
    return output.clamp_min(1e-30).log() if probabilities else output


def margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logit_target - max_{j != target} logit_j`` per row."""
    chosen = logits.gather(1, targets[:, None])[:, 0]
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return chosen - others.max(1).values


def freeze(classifier: BridgedClassifier) -> None:
    """Eval mode and no parameter gradients: the class-level tests differentiate with respect to images only."""
    classifier.module.eval()
    for parameter in classifier.module.parameters():
        parameter.requires_grad_(False)


def class_count(classifier: BridgedClassifier, shape: tuple[int, int, int]) -> int:
    """How many classes the classifier scores, from one grey image of ``shape`` (channels, height, width):
    the graph's declared output shape may be symbolic."""
    with torch.no_grad():
        return int(as_logits(classifier(torch.full((1, *shape), 0.5, device=classifier.device))).shape[1])


def logit_classifier(model: onnx.ModelProto, image: ImageInput, preprocessing: Preprocessing, device: str,
                     bridge: TorchBridge | None, test: str) -> tuple[BridgedClassifier, int, list[str]]:
    """The model as a frozen (:func:`freeze`) pixel-space classifier whose first output gives logits, its
    class count (at least 3: a class-level test compares classes), and notes on what was changed. ``test``
    names the caller in errors. ``bridge``: the model's conversion, when one was made already (used unless a
    final Softmax has to go)."""
    if None in (image.channels, image.height, image.width):
        raise ConfigError(f"the {test} needs the image input's size; {image.name} is declared "
                          f"{list(image.shape) if image.shape else 'without a shape'}")
    logits_model, stripped = without_final_softmax(model)
    if bridge is None or stripped:
        bridge = to_torch(logits_model)
    check_free_batch(bridge, image, f"the {test}")
    classifier = BridgedClassifier(bridge, preprocessing, torch_device(device))
    freeze(classifier)
    classes = class_count(classifier, (image.channels, image.height, image.width))
    if classes < 3:
        raise ConfigError(f"the {test} needs at least 3 classes to compare (the model has {classes})")
    return classifier, classes, ["final Softmax removed: margins of its logits"] if stripped else []
