"""The largest margin each class can reach (MM-BD), the evidence behind the model-level verdict.

MM-BD (Wang, Xiang, Miller, Kesidis, "MM-BD: Post-Training Detection of Backdoor
Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic",
IEEE S&P 2024): a backdoor gives its target class a shortcut that no ordinary
class has, so the largest margin ``logit_k - max_{j != k} logit_j`` that any image
reaches is abnormally large for the target, whatever the trigger looks like. Per
class, gradient ascent (Adam) on that margin from ``restarts`` random images,
kept in [0, 1] pixel space by a sigmoid; the largest margin over the starts and
steps. No data is needed. :func:`fmt_audit.verdict.margin_verdict` turns the
per-class margins into a suspicion.

Cost: ``classes x restarts x steps`` forward and backward passes of single
images, batched; independent of the data and of the number of channels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
import torch

from .bridge import BridgedClassifier, TorchBridge, check_free_batch, to_torch, torch_device
from .data import Preprocessing
from .errors import ConfigError
from .graph import ImageInput
from .verdict import MarginConfig

log = logging.getLogger(__name__)


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


def _margins(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logit_target - max_{j != target} logit_j`` per row."""
    chosen = logits.gather(1, targets[:, None])[:, 0]
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return chosen - others.max(1).values


def max_margins(classifier: BridgedClassifier, shape: tuple[int, int, int], classes: int,
                config: MarginConfig | None = None,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """The largest margin reached for each of ``classes`` classes, ``[classes]``.

    ``shape`` is the image's (channels, height, width); ``progress(k)`` is called as
    classes finish. Starting images are drawn class after class from one seeded
    generator, so the result does not depend on ``config.batch``.
    """
    config = config or MarginConfig()
    classifier.module.eval()
    for parameter in classifier.module.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    per_call = max(1, config.batch // config.restarts)     # classes optimised together
    best = np.full(classes, -np.inf)
    for first in range(0, classes, per_call):
        chunk = list(range(first, min(classes, first + per_call)))
        start = torch.cat([torch.randn((config.restarts, *shape), generator=generator) for _ in chunk])
        z = start.to(classifier.device).requires_grad_(True)
        targets = torch.tensor(chunk, device=classifier.device).repeat_interleave(config.restarts)
        optimizer = torch.optim.Adam([z], lr=config.lr)
        reached = torch.full((len(z),), float("-inf"), device=classifier.device)
        for _ in range(config.steps):
            margin = _margins(_as_logits(classifier(torch.sigmoid(z))), targets)
            reached = torch.maximum(reached, margin.detach())
            optimizer.zero_grad(set_to_none=True)
            (-margin.sum()).backward()
            optimizer.step()
        with torch.no_grad():   # the last step's images too
            margin = _margins(_as_logits(classifier(torch.sigmoid(z))), targets)
            reached = torch.maximum(reached, margin).view(len(chunk), config.restarts).max(1).values
        best[chunk] = reached.double().cpu().numpy()
        if progress:
            progress(len(chunk))
    return best


def _as_logits(output: torch.Tensor) -> torch.Tensor:
    """The model's first output as ``[N, classes]``; probabilities (rows of non-negative values summing to
    1, a Softmax the graph hides behind other ops) as their logarithm, whose differences are the logits'."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    output = output.flatten(1)
    with torch.no_grad():
        probabilities = bool((output >= 0).all()) and bool(torch.allclose(output.sum(1), torch.ones(
            len(output), device=output.device, dtype=output.dtype), atol=1e-4))
    return output.clamp_min(1e-30).log() if probabilities else output


def class_count(classifier: BridgedClassifier, shape: tuple[int, int, int]) -> int:
    """How many classes the classifier scores, from one grey image of ``shape`` (channels, height, width):
    the graph's declared output shape may be symbolic."""
    with torch.no_grad():
        return int(_as_logits(classifier(torch.full((1, *shape), 0.5, device=classifier.device))).shape[1])


def margin_test(model: onnx.ModelProto, image: ImageInput, preprocessing: Preprocessing, device: str = "auto",
                config: MarginConfig | None = None, bridge: TorchBridge | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """The per-class maximum margins of an ONNX classifier, and notes on how they were taken (a removed
    final Softmax). ``image`` gives the input's size; ``preprocessing`` the normalisation it expects;
    ``device`` is ``auto``, ``cpu`` or ``cuda``. ``bridge``: the model's conversion, when one was made
    already (used unless a final Softmax has to go)."""
    channels, height, width = image.channels, image.height, image.width
    if None in (channels, height, width):
        raise ConfigError(f"the margin test needs the image input's size; {image.name} is declared "
                          f"{list(image.shape) if image.shape else 'without a shape'}")
    logits_model, stripped = without_final_softmax(model)
    if bridge is None or stripped:
        bridge = to_torch(logits_model)
    check_free_batch(bridge, image, "the maximum-margin test")
    device = torch_device(device)
    classifier = BridgedClassifier(bridge, preprocessing, device)
    classes = class_count(classifier, (channels, height, width))
    if classes < 3:
        raise ConfigError(f"the margin test needs at least 3 classes to compare (the model has {classes})")
    notes = ["final Softmax removed: margins of its logits"] if stripped else []
    config = config or MarginConfig()
    log.info("maximum-margin test: %d classes x %d starts x %d steps on %s", classes, config.restarts, config.steps,
             device)
    return max_margins(classifier, (channels, height, width), classes, config, progress), notes
