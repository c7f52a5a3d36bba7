"""CIFAR-10 backdoored models for the benchmarks, trained here and cached outside the repository.

Data: ``../shared/datasets/cifar10.npz`` (20,000 training and 10,000 test images).
Models: a PreAct-ResNet-18-style network (four stages of two pre-activation
blocks, widths 16/32/64/128 — a quarter of the usual width so that it trains on
a 2-core CPU in minutes), exported with torch's legacy exporter at opset 13.
BatchNormalization stays in the graph: in a pre-activation network BN follows
the residual sum, so it cannot be folded into a Conv.

Attacks (10% of the training set poisoned, target class 0):
- ``badnets``: a 3x3 black/white checkerboard stamped in the bottom-right corner;
- ``blended``: a fixed uniform-noise image blended in with alpha 0.1.
``clean``: the same network trained without poison.

The defender's clean set is 5% of the training set (1,000 images), drawn from
the images that were not poisoned. Everything is seeded.

    python benchmarks/cifar_models.py [badnets|blended|clean ...]   # train what is missing

Cache: ``$FMT_AUDIT_BENCH_CACHE`` or ``~/.cache/fmt-audit/benchmarks``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10.npz"
CACHE = Path(os.environ.get("FMT_AUDIT_BENCH_CACHE", Path.home() / ".cache" / "fmt-audit" / "benchmarks"))
ATTACKS = ("badnets", "blended", "clean")
TARGET = 0
POISON_RATE = 0.10
DEFENDER_SHARE = 0.05
BLEND_ALPHA = 0.1
SEED = 0
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def load_cifar() -> dict[str, np.ndarray]:
    """NCHW uint8 arrays from the shared dataset."""
    if not DATASET.exists():
        sys.exit(f"CIFAR-10 not found at {DATASET} (see ../shared/datasets/README.md)")
    with np.load(DATASET, allow_pickle=False) as raw:
        return {"x_train": raw["x_train"].transpose(0, 3, 1, 2).copy(), "y_train": raw["y_train"].astype(np.int64),
                "x_test": raw["x_test"].transpose(0, 3, 1, 2).copy(), "y_test": raw["y_test"].astype(np.int64)}


def apply_trigger(x: np.ndarray, attack: str) -> np.ndarray:
    """Stamp the attack's trigger onto uint8 NCHW images."""
    x = x.copy()
    if attack == "badnets":
        pattern = (np.indices((3, 3)).sum(0) % 2 * 255).astype(np.uint8)   # checkerboard
        x[:, :, -4:-1, -4:-1] = pattern
    elif attack == "blended":
        noise = np.random.default_rng(12345).integers(0, 256, size=x.shape[1:]).astype(np.float32)
        x = np.clip((1 - BLEND_ALPHA) * x + BLEND_ALPHA * noise + 0.5, 0, 255).astype(np.uint8)
    else:
        raise ValueError(attack)
    return x


def split(data: dict[str, np.ndarray], attack: str) -> dict[str, np.ndarray]:
    """Poisoned training set, the defender's clean share, and triggered test images."""
    rng = np.random.default_rng(SEED)
    n = len(data["y_train"])
    order = rng.permutation(n)
    n_defender = int(DEFENDER_SHARE * n)
    defender = order[:n_defender]
    x_train, y_train = data["x_train"].copy(), data["y_train"].copy()
    if attack != "clean":
        candidates = order[n_defender:]
        poisoned = candidates[: int(POISON_RATE * n)]
        x_train[poisoned] = apply_trigger(x_train[poisoned], attack)
        y_train[poisoned] = TARGET
    keep = data["y_test"] != TARGET
    out = {"x_train": x_train, "y_train": y_train,
           "x_defender": data["x_train"][defender], "y_defender": data["y_train"][defender],
           "x_test": data["x_test"], "y_test": data["y_test"]}
    if attack != "clean":
        out["x_triggered"] = apply_trigger(data["x_test"][keep], attack)
        out["y_triggered"] = data["y_test"][keep]
    return out


def preact_resnet(width: int = 16, num_classes: int = 10):
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(cin)
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                             if stride != 1 or cin != cout else None)

        def forward(self, x):
            out = F.relu(self.bn1(x))
            shortcut = self.shortcut(out) if self.shortcut is not None else x
            out = self.conv1(out)
            out = self.conv2(F.relu(self.bn2(out)))
            return out + shortcut

    class PreActResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            blocks, cin = [], width
            for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
                for i in range(2):
                    blocks.append(Block(cin, cout, 2 if stage and i == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.bn = nn.BatchNorm2d(cin)
            self.linear = nn.Linear(cin, num_classes)

        def forward(self, x):
            out = self.blocks(self.conv1(x))
            out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
            return self.linear(out)

    return PreActResNet()


def augment(x, generator):
    """Random crop with 4-pixel padding and horizontal flip, on a float NCHW batch."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=generator)
    dy = torch.randint(0, 9, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))
    out = padded[torch.arange(n).view(n, 1, 1), :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def train(x: np.ndarray, y: np.ndarray, epochs: int, seed: int = SEED, log=print):
    """SGD with momentum and a cosine schedule; returns the trained module (normalisation inside)."""
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = preact_resnet()
    model = nn.Sequential(normalize_layer(MEAN, STD), net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(y) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, pct_start=0.15)
    xs = torch.from_numpy(x)
    ys = torch.from_numpy(y)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(ys), generator=generator)
        total, correct, started = 0.0, 0, time.time()
        for start in range(0, len(order), 128):
            idx = order[start:start + 128]
            batch = augment(xs[idx].float() / 255, generator)
            logits = model(batch)
            loss = nn.functional.cross_entropy(logits, ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == ys[idx]).sum())
        log(f"epoch {epoch + 1}/{epochs} loss {total / len(ys):.3f} train acc {correct / len(ys):.3f} "
            f"({time.time() - started:.0f} s)")
    return model.eval()


def normalize_layer(mean, std):
    import torch
    import torch.nn as nn

    class _Normalize(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

        def forward(self, x):
            return (x - self.mean) / self.std

    return _Normalize()


def accuracy(session, x: np.ndarray, y: np.ndarray) -> float:
    name = session.get_inputs()[0].name
    predictions = np.concatenate([session.run(None, {name: x[i:i + 500].astype(np.float32) / 255})[0].argmax(1)
                                  for i in range(0, len(x), 500)])
    return float((predictions == y).mean())


def save_images(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """uint8 NHWC, the layout fmt-audit reads from .npz files."""
    np.savez(path, x=x.transpose(0, 2, 3, 1), y=y)


def build(attack: str, epochs: int = 20) -> Path:
    """Train, export and measure one model; returns the cached model path (cached models are reused)."""
    import onnxruntime as ort
    import torch

    folder = CACHE / f"cifar10_{attack}"
    model_path = folder / "model.onnx"
    if model_path.exists():
        return model_path
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    parts = split(load_cifar(), attack)
    print(f"training cifar10_{attack} on {len(parts['y_train'])} images, {epochs} epochs")
    model = train(parts["x_train"], parts["y_train"], epochs)
    tmp = folder / "model.onnx.tmp"
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), str(tmp), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=13, dynamo=False)
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    facts = {"attack": attack, "target": TARGET, "epochs": epochs, "mean_std_inside_model": True,
             "acc": accuracy(session, parts["x_test"], parts["y_test"])}
    if attack != "clean":
        predictions_target = accuracy(session, parts["x_triggered"], np.full(len(parts["x_triggered"]), TARGET))
        facts["asr"] = predictions_target
    save_images(folder / "defender.npz", parts["x_defender"], parts["y_defender"])
    save_images(folder / "test.npz", parts["x_test"], parts["y_test"])
    if attack != "clean":
        save_images(folder / "triggered.npz", parts["x_triggered"], parts["y_triggered"])
    (folder / "facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    os.replace(tmp, model_path)
    print(json.dumps(facts))
    return model_path


if __name__ == "__main__":
    for name in sys.argv[1:] or ATTACKS:
        if name not in ATTACKS:
            sys.exit(f"unknown attack {name!r}; expected one of {', '.join(ATTACKS)}")
        build(name)
