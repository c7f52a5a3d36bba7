"""Larger architectures for the speed benchmark, with seeded random weights.

Timing needs the architecture, not a trained model: both methods under test see
the same weights and images, and must agree on every score. Models are exported
with torch's legacy exporter at opset 13 in eval mode (BatchNormalization folded
into the Conv layers) and cached beside the matrix models; the images are the
first CIFAR-10 test images.

- ``resnet18``: the matrix's PreAct-ResNet-18 at full width (64-512, 4,800 channels);
- ``mobilenetv2``: torchvision's MobileNetV2 (width 1.0, 10 classes) on 32x32 inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from cases import CACHE

ARCHITECTURES = ("resnet18", "mobilenetv2")


def _module(name: str):
    import torch

    torch.manual_seed(0)
    if name == "resnet18":
        from matrix import PreActResNet18

        net = PreActResNet18(64, 3, 10)
    elif name == "mobilenetv2":
        import torchvision

        net = torchvision.models.mobilenet_v2(num_classes=10)
    else:
        raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}")
    # a few batches in train mode give the BatchNorm statistics realistic, non-unit values
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.rand(64, 3, 32, 32))
    return net.eval()


def build(name: str) -> tuple[Path, Path]:
    """(model path, data path) for ``name``, exported and cached on first use."""
    import torch

    folder = CACHE / f"arch_{name}"
    model, data = folder / "model.onnx", folder / "images.npz"
    if model.exists() and data.exists():
        return model, data
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.onnx.tmp"
    torch.onnx.export(_module(name), torch.zeros(1, 3, 32, 32), str(tmp), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
                      opset_version=13, dynamo=False)
    os.replace(tmp, model)
    from matrix import load_shared, save_images

    cifar = load_shared("cifar10")
    save_images(data, cifar["x_test"][:1024], cifar["y_test"][:1024])
    return model, data


def model_paths(name: str):
    model, data = build(name)
    yield name, model, data


if __name__ == "__main__":
    import sys

    for arch in sys.argv[1:] or ARCHITECTURES:
        print(arch, *build(arch), np.load(build(arch)[1])["x"].shape)
