"""The architectures and exporters users bring (issue 9): builders of coverage cases, random weights.

Nothing here downloads: every network is torchvision's own class with seeded
random weights (a few train-mode batches give BatchNorm realistic statistics).

* :data:`FAMILIES`: resnet, vgg, mobilenet_v2, efficientnet (squeeze-and-excitation),
  shufflenet (channel shuffle through Reshape/Transpose), densenet (Concat) and
  inception (GoogLeNet's branches), each at two sizes: ``mini`` (the same classes
  at tiny widths, for the test suite) and ``full`` (torchvision's published
  configuration: resnet18, vgg11_bn, mobilenet_v2, efficientnet_b0,
  shufflenet_v2_x1_0, densenet121, googlenet; for ``benchmarks/coverage.py``).
* :data:`EXPORTERS`: torch's legacy exporter at opsets 11, 13 and 17, and its
  default (dynamo) exporter, whose graphs keep their weights as external data.
* :data:`GRAPHS`: hand-built graphs in styles the exporters above do not produce:
  an old model zoo's opset-8 BatchNormalization, an NHWC input followed by a
  Transpose (as TensorFlow converters write), a graph fixed to batch size 1,
  Convs without bias and a BatchNormalization left after its Conv.

Used by ``tests/test_coverage.py`` and ``benchmarks/coverage.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fmt_audit.backends.onnxrt.session import OrtClassifier
from fmt_audit.data import Dataset, Preprocessing

CLASSES = 10
EXPORTERS = ("legacy-11", "legacy-13", "legacy-17", "dynamo")


@dataclass(frozen=True)
class Family:
    """One architecture family: how to build it at each size, and the input size each exporter can take."""

    name: str
    full_name: str                       # torchvision's name of the full-size network
    mini: Callable[[], object]
    full: Callable[[], object]
    size: int = 32
    # the legacy exporter cannot export an adaptive pooling that has to upsample
    # (VGG's AdaptiveAvgPool2d((7, 7)) on a smaller map): the input size it needs
    legacy_size: dict[str, int] | None = None
    why_size: str = ""

    def input_size(self, size: str, exporter: str) -> int:
        if exporter.startswith("legacy") and self.legacy_size:
            return self.legacy_size[size]
        return self.size


def _mini_resnet():
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES)


def _mini_vgg():
    import torch.nn as nn
    from torchvision.models.vgg import VGG, make_layers

    net = VGG(make_layers([8, "M", 16, "M", 32, "M"], batch_norm=True), num_classes=CLASSES)
    net.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, CLASSES))
    return net


def _mini_mobilenet_v2():
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(num_classes=CLASSES, width_mult=0.25,
                        inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 1, 2]])


def _mini_efficientnet():
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    stages = [MBConvConfig(1, 3, 1, 16, 8, 1, 0.5, 1.0), MBConvConfig(6, 3, 2, 8, 16, 1, 0.5, 1.0),
              MBConvConfig(6, 5, 2, 16, 24, 1, 0.5, 1.0)]
    return EfficientNet(stages, 0.2, num_classes=CLASSES, last_channel=64)


def _mini_shufflenet():
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    return ShuffleNetV2([2, 1, 1], [8, 16, 32, 64, 128], num_classes=CLASSES)   # 2: a unit that splits


def _mini_densenet():
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=CLASSES)


def _mini_inception():
    import torch.nn as nn
    from torchvision.models.googlenet import BasicConv2d, Inception

    return nn.Sequential(BasicConv2d(3, 16, kernel_size=3, padding=1), nn.MaxPool2d(2),
                         Inception(16, 8, 8, 12, 4, 4, 4), Inception(28, 8, 8, 12, 4, 4, 4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(28, CLASSES))


def _torchvision(name: str, **kwargs) -> Callable[[], object]:
    def build():
        import torchvision

        return getattr(torchvision.models, name)(num_classes=CLASSES, **kwargs)
    return build


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("resnet", "resnet18", _mini_resnet, _torchvision("resnet18")),
    Family("vgg", "vgg11_bn", _mini_vgg, _torchvision("vgg11_bn"), legacy_size={"mini": 56, "full": 224},
           why_size="the legacy exporter cannot export VGG's AdaptiveAvgPool2d((7, 7)) when it has to upsample: "
                    "its input must leave a 7x7 map (mini: 56, full: 224)"),
    Family("mobilenet_v2", "mobilenet_v2", _mini_mobilenet_v2, _torchvision("mobilenet_v2")),
    Family("efficientnet", "efficientnet_b0", _mini_efficientnet, _torchvision("efficientnet_b0")),
    Family("shufflenet", "shufflenet_v2_x1_0", _mini_shufflenet, _torchvision("shufflenet_v2_x1_0")),
    Family("densenet", "densenet121", _mini_densenet, _torchvision("densenet121")),
    Family("inception", "googlenet", _mini_inception,
           _torchvision("googlenet", aux_logits=False, init_weights=True)),
)}


def network(family: str, size: str = "mini", seed: int = 0):
    """The eval-mode torch module of ``family`` at ``size`` (mini | full), seeded random weights."""
    import torch

    torch.manual_seed(seed)
    chosen = FAMILIES[family]
    net = chosen.mini() if size == "mini" else chosen.full()
    pixels = chosen.input_size(size, "dynamo")
    with torch.no_grad():   # realistic, non-unit BatchNorm statistics
        net.train()
        for _ in range(2):
            net(torch.rand(8, 3, pixels, pixels))
    return net.eval()


def export(net, exporter: str, path: Path, pixels: int, batch: int | None = None) -> Path:
    """Export ``net`` to ``path`` with ``exporter`` (one of :data:`EXPORTERS`); ``batch`` fixes the batch size.

    The dynamo exporter writes the weights to ``path.name + '.data'`` beside the graph."""
    import tempfile

    import torch

    example = torch.zeros(batch or 2, 3, pixels, pixels)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        staged = Path(work) / path.name     # the graph names its data file after this name
        if exporter == "dynamo":
            shapes = None if batch else ({0: torch.export.Dim("n")},)
            torch.onnx.export(net, (example,), str(staged), input_names=["input"], output_names=["logits"],
                              dynamic_shapes=shapes, dynamo=True, external_data=True)
        elif exporter in EXPORTERS:
            axes = None if batch else {"input": {0: "n"}, "logits": {0: "n"}}
            torch.onnx.export(net, example, str(staged), input_names=["input"], output_names=["logits"],
                              dynamic_axes=axes, opset_version=int(exporter.split("-")[1]), dynamo=False)
        else:
            raise ValueError(f"unknown exporter {exporter!r}; expected one of {', '.join(EXPORTERS)}")
        for produced in sorted(Path(work).iterdir(), key=lambda p: p.suffix != ".data"):   # data first
            os.replace(produced, path.parent / produced.name)
    return path


def small_graph(opset: int = 13, layout: str = "NCHW", batch: int | None = None, conv_bias: bool = True,
                batchnorm: bool = False, seed: int = 0) -> onnx.ModelProto:
    """A hand-built two-Conv classifier of 3x32x32 images (seeded random weights):

    input [-> Transpose(NHWC to NCHW)] -> Conv 3->8 [-> BatchNormalization] -> Relu -> MaxPool
    -> Conv 8->16 [-> BatchNormalization] -> Relu -> GlobalAveragePool -> Reshape or Flatten -> Gemm -> logits.

    ``batch`` fixes the batch size (the flattening Reshape then names it, as a
    legacy exporter does); below opset 9 BatchNormalization carries ``spatial=1``.
    """
    rng = np.random.default_rng(seed)
    stored: list[TensorProto] = []

    def tensor(name: str, values: np.ndarray) -> str:
        stored.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    nodes, current = [], "input"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]))
        current = "nchw"
    for index, (c_in, c_out) in enumerate(((3, 8), (8, 16)), start=1):
        weight = tensor(f"conv{index}.weight", rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2 / (9 * c_in)))
        inputs = [current, weight] + ([tensor(f"conv{index}.bias", 0.1 * rng.standard_normal(c_out))]
                                      if conv_bias else [])
        nodes.append(helper.make_node("Conv", inputs, [f"conv{index}"], name=f"conv{index}", pads=[1, 1, 1, 1],
                                      kernel_shape=[3, 3]))
        current = f"conv{index}"
        if batchnorm:
            params = [tensor(f"bn{index}.{n}", v) for n, v in (
                ("scale", 1 + 0.2 * rng.standard_normal(c_out)), ("bias", 0.1 * rng.standard_normal(c_out)),
                ("mean", 0.1 * rng.standard_normal(c_out)), ("var", 0.5 + rng.random(c_out)))]
            extra = {"spatial": 1} if opset < 9 else {}
            nodes.append(helper.make_node("BatchNormalization", [current, *params], [f"bn{index}"],
                                          name=f"bn{index}", epsilon=1e-5, **extra))
            current = f"bn{index}"
        nodes.append(helper.make_node("Relu", [current], [f"relu{index}"], name=f"relu{index}"))
        current = f"relu{index}"
        if index == 1:
            nodes.append(helper.make_node("MaxPool", [current], ["pool1"], name="pool1", kernel_shape=[2, 2],
                                          strides=[2, 2]))
            current = "pool1"
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["gap"], name="gap"))
    if batch:
        stored.append(numpy_helper.from_array(np.array([batch, 16], np.int64), "flat_shape"))
        nodes.append(helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"], name="flatten"))
    else:
        nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    fc_weight = tensor("fc.weight", rng.standard_normal((CLASSES, 16)) * 0.5)
    nodes.append(helper.make_node("Gemm", ["flat", fc_weight, tensor("fc.bias", np.zeros(CLASSES))], ["logits"],
                                  name="fc", transB=1))
    dims = [batch or "n", 32, 32, 3] if layout == "NHWC" else [batch or "n", 3, 32, 32]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch or "n", CLASSES])],
                              initializer=stored)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fmt-audit-zoo")
    if opset < 9:   # the model zoos of that time: IR 3, every initializer also listed as a graph input
        model.ir_version = 3
        model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in stored)
    else:
        model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


GRAPHS: dict[str, Callable[[], onnx.ModelProto]] = {
    "old-zoo-opset8-batchnorm": lambda: small_graph(opset=8, batchnorm=True),
    "nhwc-input-transpose": lambda: small_graph(layout="NHWC"),
    "fixed-batch-1": lambda: small_graph(batch=1),
    "conv-without-bias": lambda: small_graph(conv_bias=False),
    "unfolded-batchnorm": lambda: small_graph(batchnorm=True),
}


def own_labels(loaded, count: int = 24) -> Dataset:
    """Seeded random images labelled by the model itself (its accuracy on them is 1)."""
    image = loaded.image_input
    x = np.random.default_rng(0).random((count, image.channels, image.height, image.width)).astype(np.float32)
    return Dataset(x, OrtClassifier(loaded.proto, "cpu", Preprocessing()).predict(x))


def structure(model: onnx.ModelProto, original: onnx.ModelProto) -> list:
    """What the write-back must keep: opset, graph inputs and outputs, and every node (type, name, outputs,
    attributes, inputs). Allowed changes, both documented in ``write_back``: an Identity copy of a stored
    tensor may become an initializer of the same name, and a shared tensor's reader may read ``NAME.k``."""
    stored = {t.name for t in original.graph.initializer}
    kept = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in stored:
            continue
        inputs = [name.rsplit(".", 1)[0] if name not in stored and name.rsplit(".", 1)[0] in stored else name
                  for name in node.input]
        kept.append((node.op_type, node.name, list(node.output), inputs,
                     [a.SerializeToString() for a in node.attribute]))
    io = [(v.name, v.type.SerializeToString()) for v in [*model.graph.input, *model.graph.output]
          if v.name not in {t.name for t in model.graph.initializer}]
    return [list(model.opset_import), io, kept]
