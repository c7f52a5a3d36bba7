"""Small clean networks trained on the defender's own images: references for what the data alone makes easy.

Some classes are easy to reach in every network trained on a dataset, backdoored or not (natural attractor
classes: in the project's populations MNIST 8, CIFAR-10 6; benchmarks/README.md, Verdict). Their shortcuts
come from the data, so a network trained from scratch on a few hundred of the defender's clean images shares
them; a backdoor's shortcut lives only in the audited model. :mod:`~.evidence.transfer` asks whether what
makes a class easy in the audited model is easy in these references too.

A reference is a plain CNN (three 3x3 convolutions with BatchNorm and ReLU, one 2x2 max pool, global average
pooling, one linear layer) for any input size, trained from a seed with AdamW, a one-cycle schedule and
random crops, in [0, 1] pixel space (the space the class-level tests perturb in): no preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fmt_audit.data import Dataset
from fmt_audit.errors import DataError
from fmt_audit.verdict.config import ReferenceConfig


class ReferenceClassifier:
    """A trained reference network on [0, 1] pixel-space NCHW images; calling it gives logits (the interface
    of :class:`fmt_audit.backends.torch.bridge.BridgedClassifier` the class-level tests use: ``module``, ``device``)."""

    def __init__(self, module: nn.Module, device: str):
        self.module = module.to(device).eval()
        self.device = device
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def reference_network(channels: int, classes: int, widths: Sequence[int] = (16, 32, 32)) -> nn.Module:
    """The untrained reference architecture for ``channels``-channel images of any size."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        layers += [nn.Conv2d(channels if i == 0 else widths[i - 1], width, 3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU()]
        if i == 1:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], classes))


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crops of the images zero-padded by ``pad`` pixels, one offset per image (``x`` as it is for 0)."""
    if pad == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=generator) for _ in range(2))
    rows = (torch.arange(h)[None] + dy[:, None])[:, None, :, None].expand(-1, c, -1, w + 2 * pad)
    cols = (torch.arange(w)[None] + dx[:, None])[:, None, None, :].expand(-1, c, h, -1)
    return padded.gather(2, rows).gather(3, cols)


def train_reference(dataset: Dataset, classes: int, device: str = "cpu", config: ReferenceConfig | None = None,
                    seed: int = 0) -> ReferenceClassifier:
    """A reference trained from ``seed`` on ``dataset`` (float NCHW images in [0, 1], labels in
    ``[0, classes)``); deterministic on CPU for a seed."""
    config = config or ReferenceConfig()
    x, y = dataset.x, dataset.y
    if len(x) < 2 or x.ndim != 4:
        raise DataError(f"a reference network needs at least 2 NCHW images; got shape {list(x.shape)}")
    if y is None or y.min() < 0 or y.max() >= classes:
        raise DataError(f"reference networks need labels in [0, {classes - 1}] for this {classes}-class model; "
                        + ("got none" if y is None else f"got {int(y.min())}..{int(y.max())}"))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = reference_network(x.shape[1], classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps)
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    labels = torch.from_numpy(y.astype(np.int64))
    batch = min(config.batch, len(images))
    order = torch.randperm(len(images), generator=generator)
    position = 0
    model.train()
    for _ in range(config.steps):
        if position + batch > len(order):
            order, position = torch.randperm(len(images), generator=generator), 0
        idx = order[position:position + batch]
        position += batch
        loss = F.cross_entropy(model(random_crop(images[idx], config.crop, generator)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return ReferenceClassifier(model, device)


def reference_arrays(references: Sequence[ReferenceClassifier]) -> dict[str, np.ndarray]:
    """Every reference's parameters and BatchNorm statistics as named arrays (``"<index>/<name>"``): what
    :func:`references_from_arrays` rebuilds them from, storable with ``np.savez`` (no pickle)."""
    return {f"{i}/{name}": value.detach().cpu().numpy()
            for i, reference in enumerate(references) for name, value in reference.module.state_dict().items()}


def references_from_arrays(arrays: dict[str, np.ndarray], channels: int, classes: int,
                           device: str = "cpu") -> list[ReferenceClassifier]:
    """The references :func:`reference_arrays` stored, for ``channels``-channel images and ``classes`` classes.
    Raises ``ValueError`` when the arrays are not a whole set of that architecture."""
    count = len({name.split("/", 1)[0] for name in arrays})
    references = []
    for i in range(count):
        module = reference_network(channels, classes)
        expected = module.state_dict()
        state = {name: arrays.get(f"{i}/{name}") for name in expected}
        if any(value is None or value.shape != tuple(expected[name].shape)
               or value.dtype != expected[name].numpy().dtype for name, value in state.items()):
            raise ValueError(f"reference {i} does not fit a {channels}-channel, {classes}-class reference network")
        module.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in state.items()})
        references.append(ReferenceClassifier(module, device))
    if not references or len(arrays) != count * len(reference_network(channels, classes).state_dict()):
        raise ValueError("not a whole set of reference networks")
    return references

