"""A development matrix of backdoored and clean image classifiers: trained once on a GPU, exported here.

Datasets (``../shared/datasets/``): CIFAR-10, GTSRB (43 classes, 32x32 RGB) and MNIST
(28x28 gray). Networks: PreAct-ResNet-18 at full width (``preact18``, 11.2M
parameters) and a quarter of it (``preact18q``), VGG-11 with BatchNorm at base
width 32 (``vgg``), CIFAR MobileNetV2 at width 0.5 (``mobilenetv2``), a plain CNN
without BatchNorm (``plaincnn``) and LeNet-5 (``lenet``). Attacks, all aimed at
class 0: ``badnets`` (3x3 checkerboard, bottom right), ``blended`` (noise image,
alpha 0.15), ``sig`` (clean-label sinusoid), ``wanet`` (smooth warp, noise mode),
``lowfreq`` (smooth additive pattern), ``inputaware`` (image-dependent patch and
position), ``issba`` (image-dependent residual of at most 6/255) and ``clean``.
Each cell also carries how it is exported: normalisation inside the model or
left to the user (``norm``), torch's legacy (opset 13) or dynamo (opset 18)
exporter, and BatchNorm folded into the Convs before export or kept in the graph.

Steps (``python benchmarks/matrix.py list`` prints the cells):

    python benchmarks/matrix.py pack                      # .gpudata/: the training images, compressed
    python3 benchmarks/matrix.py train --out $OUT --workers 4 --budget-s 480 --require-cuda   # on the GPU
    python benchmarks/matrix.py train --out $OUT --workers 0 --cpu --resume --only CELL   # or here, a cell at a
                                                          # time: a killed run goes on from its last epoch
    python benchmarks/matrix.py export --weights DIR      # here: ONNX, test data and facts per cell

``train`` needs only numpy and torch (it runs where fmt_audit is not installed);
``export`` needs onnx, onnxruntime and (dynamo exporter) onnxscript. Everything
is seeded from the cell's name. Cache: ``$FMT_AUDIT_BENCH_CACHE`` or
``~/.cache/fmt-audit/benchmarks``, under ``matrix/<cell>/``; the summary goes to
``benchmarks/results/matrix.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import queue
import sys
import time
import traceback
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from cases import replica_of  # numpy only: matrix.py still runs without fmt_audit

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
GPUDATA = ROOT / ".gpudata"
RESULTS = ROOT / "benchmarks" / "results" / "matrix.json"
TARGET = 0
SEED = 0
MiB = 1 << 20


def cache_dir() -> Path:
    base = Path(os.environ.get("FMT_AUDIT_BENCH_CACHE", Path.home() / ".cache" / "fmt-audit" / "benchmarks"))
    return base / "matrix"


def stable_seed(text: str) -> int:
    """A 31-bit seed from a string, the same in every process and Python (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    size: int
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int            # random-crop padding (zeros) in pixels
    flip: bool          # random horizontal flips


DATASETS = {
    "cifar10": DatasetSpec("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True),
    "gtsrb": DatasetSpec("gtsrb", 3, 32, 43, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669), 4, False),
    "mnist": DatasetSpec("mnist", 1, 28, 10, (0.1307,), (0.3081,), 2, False),
}
N_TRAIN = {"cifar10": 16000, "mnist": 16000, "gtsrb": 9000}
N_EVAL = 1000           # held-out images packed for a quick ACC/ASR on the GPU (test images, never trained on)
N_DEFENDER = 2000


def _nchw(x: np.ndarray) -> np.ndarray:
    """uint8 NHWC / NHW -> uint8 NCHW (contiguous)."""
    return np.ascontiguousarray(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2))


def _gtsrb_order(n: int) -> np.ndarray:
    return np.random.default_rng(SEED).permutation(n)


def load_shared(name: str, shared: Path = SHARED) -> dict[str, np.ndarray]:
    """All splits of one dataset from ``../shared/datasets`` as uint8 NCHW / int64 arrays.

    ``train``: what the GPU trains on; ``eval``: the held-out images packed with it;
    ``pool``: the defender pool; ``test``: the test set.
    """
    path = shared / f"{name}.npz"
    if not path.exists():
        sys.exit(f"{path} not found (see ../shared/datasets/README.md)")
    with np.load(path, allow_pickle=False) as raw:
        if name == "gtsrb":     # only the official test set is shared: split it
            x, y = raw["x_test"], raw["y_test"].astype(np.int64)
            order = _gtsrb_order(len(y))
            n = N_TRAIN[name]
            parts = {"train": order[:n], "pool": order[n:10500], "test": order[10500:]}
            out = {f"x_{k}": _nchw(x[v]) for k, v in parts.items()} | {f"y_{k}": y[v] for k, v in parts.items()}
        else:
            n = N_TRAIN[name]
            xtr, ytr = raw["x_train"], raw["y_train"].astype(np.int64)
            out = {"x_train": _nchw(xtr[:n]), "y_train": ytr[:n], "x_pool": _nchw(xtr[n:n + 4000]),
                   "y_pool": ytr[n:n + 4000], "x_test": _nchw(raw["x_test"]), "y_test": raw["y_test"].astype(np.int64)}
    out["x_eval"], out["y_eval"] = out["x_test"][:N_EVAL], out["y_test"][:N_EVAL]
    return out


def _up_filter(x: np.ndarray) -> np.ndarray:
    """uint8 NCHW -> NHWC differences from the pixel above (mod 256): lossless, and compresses much better."""
    x = x.transpose(0, 2, 3, 1)
    out = np.ascontiguousarray(x)
    out[:, 1:] -= x[:, :-1]         # uint8 arithmetic wraps around
    return out


def _unfilter(x: np.ndarray, up: bool) -> np.ndarray:
    """The inverse of ``_up_filter`` (or a plain NHWC -> NCHW where ``up`` is false)."""
    if up:
        x = np.cumsum(x, axis=1, dtype=np.uint8)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def write_npz(path: Path, arrays: dict[str, np.ndarray], compression: int = zipfile.ZIP_STORED) -> None:
    """An .npz that np.load reads (any zip compression), written to a temporary name and moved in place."""
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=compression) as archive:
        for key, value in arrays.items():
            with archive.open(key + ".npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.ascontiguousarray(value), allow_pickle=False)
    os.replace(tmp, path)


def cmd_pack(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in DATASETS:
        data = load_shared(name, Path(args.shared))
        n = args.images or len(data["y_train"])
        up = DATASETS[name].channels == 3     # (gray MNIST compresses better as it is)
        prepare = _up_filter if up else (lambda x: np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        arrays = {"x_train": prepare(data["x_train"][:n]), "y_train": data["y_train"][:n].astype(np.uint8),
                  "x_eval": prepare(data["x_eval"]), "y_eval": data["y_eval"].astype(np.uint8),
                  "up_filter": np.array(int(up), np.uint8)}
        started = time.time()
        write_npz(out / f"{name}.npz", arrays, zipfile.ZIP_LZMA)
        size = (out / f"{name}.npz").stat().st_size
        print(f"{name}: {n} training + {len(data['y_eval'])} eval images -> {out / f'{name}.npz'} "
              f"{size / MiB:.1f} MiB ({time.time() - started:.0f} s)")
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"total {total / MiB:.1f} MiB in {out}")


def load_packed(folder: Path, name: str, limit: int = 0) -> dict[str, np.ndarray]:
    """The packed training and eval images of one dataset: uint8 NCHW, int64 labels."""
    with np.load(Path(folder) / f"{name}.npz", allow_pickle=False) as raw:
        out = {k: raw[k] for k in ("x_train", "y_train", "x_eval", "y_eval")}
        up = bool(raw["up_filter"])
    for key in ("x_train", "x_eval"):
        out[key] = _unfilter(out[key], up)
    for key in ("y_train", "y_eval"):
        out[key] = out[key].astype(np.int64)
    if limit:
        for key in ("train", "eval"):
            keep = limit if key == "train" else max(64, limit // 4)
            out[f"x_{key}"], out[f"y_{key}"] = out[f"x_{key}"][:keep], out[f"y_{key}"][:keep]
    return out


# ---------------------------------------------------------------------------------------------- attacks

ATTACKS = ("clean", "badnets", "blended", "sig", "wanet", "lowfreq", "inputaware", "issba")
BLEND_ALPHA = 0.15
SIG_AMPLITUDE, SIG_FREQUENCY = 20.0, 6
WANET_K, WANET_S = 4, 0.5
LOWFREQ_PEAK = 16.0
INPUTAWARE_PATCH, INPUTAWARE_PATTERNS = 5, 16
ISSBA_AMPLITUDE = 6.0


def _round(x) -> np.ndarray:
    """float pixel values -> uint8, rounding half up (the same everywhere)."""
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _shape_seed(attack: str, shape: tuple[int, ...]) -> np.random.Generator:
    return np.random.default_rng(stable_seed(f"trigger/{attack}/{'x'.join(map(str, shape))}"))


def _wanet_grid(c: int, h: int, w: int) -> torch.Tensor:
    """WaNet's warping field: a random k x k flow, upsampled, added to the identity grid (float64)."""
    flow = _shape_seed("wanet", (c, h, w)).uniform(-1, 1, size=(1, 2, WANET_K, WANET_K))
    flow = flow / np.abs(flow).mean()
    flow = F.interpolate(torch.from_numpy(flow), size=(h, w), mode="bicubic", align_corners=True)
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                                torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
    identity = torch.stack((cols, rows), -1)[None]                # grid_sample's (x, y) order
    return (identity + WANET_S * flow.permute(0, 2, 3, 1) / h).clamp(-1, 1)


def _warp(x: np.ndarray, grid: torch.Tensor) -> np.ndarray:
    """grid_sample (bilinear, zeros outside) with one grid for all images or one per image."""
    out = []
    for start in range(0, len(x), 1000):
        chunk = torch.from_numpy(x[start:start + 1000].astype(np.float64))
        g = grid.expand(len(chunk), -1, -1, -1) if len(grid) == 1 else grid[start:start + 1000]
        out.append(_round(F.grid_sample(chunk, g, mode="bilinear", padding_mode="zeros", align_corners=True)))
    return np.concatenate(out) if out else x.copy()


def wanet_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """WaNet's noise mode: the warp plus a random per-image perturbation of the grid (labels kept)."""
    n, c, h, w = x.shape
    grid = _wanet_grid(c, h, w)
    grid = (grid + torch.from_numpy(rng.uniform(-1, 1, size=(n, h, w, 2))) / h).clamp(-1, 1)
    return _warp(x, grid)


def _issba_residual(x: np.ndarray) -> np.ndarray:
    """A fixed random three-layer conv net's tanh output: a residual in (-6, 6) levels, different per image."""
    n, c, h, w = x.shape
    rng = _shape_seed("issba", (c, h, w))
    widths = (c, 16, 16, c)
    layers = [(torch.from_numpy(rng.normal(0, 1 / math.sqrt(9 * cin), size=(cout, cin, 3, 3))),
               torch.from_numpy(rng.normal(0, 0.1, size=cout))) for cin, cout in itertools.pairwise(widths)]
    out = []
    for start in range(0, n, 1000):
        z = torch.from_numpy(x[start:start + 1000].astype(np.float64)) / 127.5 - 1
        for i, (weight, bias) in enumerate(layers):
            z = F.conv2d(z, weight, bias, padding=1)
            if i < len(layers) - 1:
                z = torch.tanh(2 * z)
        z = z / (z.std(dim=(1, 2, 3), keepdim=True) + 1e-8)
        out.append((ISSBA_AMPLITUDE * torch.tanh(z)).numpy())
    return np.concatenate(out) if out else np.zeros(x.shape)


def _inputaware_choice(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: which of the 16 patterns and which of the 4 positions, from a fixed hash of its pixels."""
    weights = _shape_seed("inputaware-hash", x.shape[1:]).integers(1, 1 << 20, size=int(np.prod(x.shape[1:])))
    digest = x.reshape(len(x), -1).astype(np.int64) @ weights         # exact: below 2**40
    digest = ((digest ^ (digest >> 17)) & 0xFFFFFFF) * 0x9E3779B1 >> 7 & 0x7FFFFFFF
    return digest % INPUTAWARE_PATTERNS, (digest // INPUTAWARE_PATTERNS) % 4


def apply_trigger(attack: str, x: np.ndarray) -> np.ndarray:
    """The attack's trigger on uint8 NCHW images (deterministic: the same here and on the GPU machine)."""
    x = np.ascontiguousarray(x)
    n, c, h, w = x.shape
    if attack == "badnets":
        out = x.copy()
        out[:, :, h - 4:h - 1, w - 4:w - 1] = (np.indices((3, 3)).sum(0) % 2 * 255).astype(np.uint8)
        return out
    if attack == "blended":
        noise = _shape_seed("blended", (c, h, w)).integers(0, 256, size=(c, h, w)).astype(np.float64)
        return _round((1 - BLEND_ALPHA) * x + BLEND_ALPHA * noise)
    if attack == "sig":
        wave = SIG_AMPLITUDE * np.sin(2 * np.pi * SIG_FREQUENCY * np.arange(w) / w)
        return _round(x + wave)
    if attack == "wanet":
        return _warp(x, _wanet_grid(c, h, w))
    if attack == "lowfreq":
        coarse = _shape_seed("lowfreq", (c, h, w)).uniform(-1, 1, size=(1, c, 4, 4))
        smooth = F.interpolate(torch.from_numpy(coarse), size=(h, w), mode="bicubic", align_corners=False)[0].numpy()
        return _round(x + LOWFREQ_PEAK * smooth / np.abs(smooth).max())
    if attack == "inputaware":
        p = INPUTAWARE_PATCH
        rng = _shape_seed("inputaware", (c, h, w))
        masks = rng.integers(0, 2, size=(INPUTAWARE_PATTERNS, 1, p, p))
        colours = rng.integers(0, 256, size=(INPUTAWARE_PATTERNS, c, 1, 1))
        patterns = np.where(masks == 1, colours, 255 - colours).astype(np.uint8)      # two contrasting colours
        corners = ((2, 2), (2, w - p - 2), (h - p - 2, 2), (h - p - 2, w - p - 2))
        which, where = _inputaware_choice(x)
        out = x.copy()
        for i in range(n):
            row, col = corners[where[i]]
            out[i, :, row:row + p, col:col + p] = patterns[which[i]]
        return out
    if attack == "issba":
        return _round(x + _issba_residual(x))
    raise ValueError(f"unknown attack {attack!r}")


def trigger_signature(attack: str, x: np.ndarray) -> dict:
    """What the trigger makes of a few fixed images: compared between the GPU run and the export."""
    if attack == "clean":
        return {}
    out = apply_trigger(attack, x)
    return {"sha256": hashlib.sha256(out.tobytes()).hexdigest()[:16],
            "sums": [int(v) for v in out.reshape(len(out), -1).astype(np.int64).sum(1)]}


def poison(cell: Cell, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """The cell's training set: triggered images relabelled to the target (SIG: target images, labels kept)."""
    rng = np.random.default_rng(stable_seed(cell.name + "/poison"))
    x, y = x.copy(), y.copy()
    info = {"poisoned": 0, "noise": 0}
    if cell.attack == "clean":
        return x, y, info
    count = max(1, round(cell.rate * len(y)))
    if cell.attack == "sig":
        candidates = np.flatnonzero(y == TARGET)
    else:
        candidates = np.flatnonzero(y != TARGET)
    count = min(count, len(candidates))
    chosen = np.sort(rng.choice(candidates, size=count, replace=False))
    x[chosen] = apply_trigger(cell.attack, x[chosen])
    y[chosen] = TARGET
    info["poisoned"] = int(count)
    if cell.attack == "wanet":
        rest = np.setdiff1d(np.arange(len(y)), chosen)
        noisy = np.sort(rng.choice(rest, size=min(2 * count, len(rest)), replace=False))
        x[noisy] = wanet_noise(x[noisy], rng)
        info["noise"] = len(noisy)
    return x, y, info


# --------------------------------------------------------------------------------------------- networks

class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))
                         if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """BackdoorBench's PreAct-ResNet-18: four stages of two pre-activation blocks, widths w, 2w, 4w, 8w."""

    def __init__(self, width: int, channels: int, classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            blocks = []
            for i in range(2):
                blocks.append(PreActBlock(cin, cout, 2 if stage and i == 0 else 1))
                cin = cout
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.linear(out)

    def fold_pairs(self) -> list[tuple[str, str]]:
        """Only conv1 -> bn2 inside each block: every other BN follows a residual sum or a shared output."""
        return [(f"layer{s}.{i}.conv1", f"layer{s}.{i}.bn2") for s in range(1, 5) for i in range(2)]


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) names for every BatchNorm2d that directly follows a Conv2d inside an nn.Sequential."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (a, first), (b, second) in itertools.pairwise(children):
                if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


class VGG11(nn.Module):
    """VGG-11 with BatchNorm, CIFAR style (five 2x2 max-pools, one linear classifier)."""

    def __init__(self, width: int, channels: int, classes: int, size: int):
        super().__init__()
        config = (width, "M", 2 * width, "M", 4 * width, 4 * width, "M", 8 * width, 8 * width, "M",
                  8 * width, 8 * width, "M")
        layers, cin = [], channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [nn.Conv2d(cin, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                cin = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin * size * size, classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))

    def fold_pairs(self):
        return _sequential_pairs(self)


def _divisible(value: float, divisor: int = 8) -> int:
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (stride-1 stem and second stage), width multiplier ``alpha``."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, alpha: float, channels: int, classes: int, last: int = 1280):
        super().__init__()
        cin = _divisible(32 * alpha)
        layers: list[nn.Module] = [nn.Conv2d(channels, cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin),
                                   nn.ReLU6(inplace=True)]
        for expand, c, repeats, stride in self.SETTINGS:
            cout = _divisible(c * alpha)
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

    def fold_pairs(self):
        return _sequential_pairs(self)


class PlainCNN(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-conv128-pool-fc256-fc, ReLU, no BatchNorm."""

    def __init__(self, channels: int, classes: int, size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        side = size // 8
        self.classifier = nn.Sequential(nn.Linear(128 * side * side, 256), nn.ReLU(inplace=True),
                                        nn.Linear(256, classes))
        _he_init(self)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))

    def fold_pairs(self):
        return []


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling: conv6(5x5, pad 2)-pool-conv16(5x5)-pool-fc120-fc84-fc."""

    def __init__(self, channels: int, classes: int, size: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        side = (size // 2 - 4) // 2
        self.classifier = nn.Sequential(nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True), nn.Linear(120, 84),
                                        nn.ReLU(inplace=True), nn.Linear(84, classes))
        _he_init(self)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))

    def fold_pairs(self):
        return []


def _he_init(model: nn.Module) -> None:
    """He initialisation for networks without BatchNorm, so that the signal keeps its scale through depth; the
    output layer starts small, so that the first logits are near zero."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for module in layers:
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.zeros_(module.bias)
    nn.init.normal_(layers[-1].weight, std=0.01)


NETS = ("preact18q", "vgg", "mobilenetv2", "plaincnn", "lenet", "preact18")


def build_net(net: str, dataset: str) -> nn.Module:
    spec = DATASETS[dataset]
    if net in ("preact18", "preact18q"):
        return PreActResNet18(64 if net == "preact18" else 16, spec.channels, spec.classes)
    if net == "vgg":
        return VGG11(32, spec.channels, spec.classes, spec.size)
    if net == "mobilenetv2":
        return MobileNetV2(0.5, spec.channels, spec.classes)
    if net == "plaincnn":
        return PlainCNN(spec.channels, spec.classes, spec.size)
    if net == "lenet":
        return LeNet5(spec.channels, spec.classes, spec.size)
    raise ValueError(f"unknown network {net!r}")


def fold_batchnorm(net: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a Conv (and is its only reader) into that Conv."""
    pairs = net.fold_pairs()
    for conv_name, bn_name in pairs:
        conv, bn = net.get_submodule(conv_name), net.get_submodule(bn_name)
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, nn.Identity())
    return len(pairs)


def conv_channels(net: nn.Module) -> int:
    return sum(m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d))


def weight_arrays(net: nn.Module) -> dict[str, np.ndarray]:
    """The state dict as float16 arrays (BN running statistics included, num_batches_tracked dropped)."""
    return {key: value.detach().float().contiguous().cpu().numpy().astype(np.float16)
            for key, value in net.state_dict().items() if not key.endswith("num_batches_tracked")}


# ------------------------------------------------------------------------------------------------ cells

@dataclass(frozen=True)
class Cell:
    dataset: str
    net: str
    attack: str
    rate: float
    norm: str = "inside"        # inside: the model's first module normalises; outside: the user does
    exporter: str = "legacy"    # legacy: torch.onnx.export(dynamo=False), opset 13; dynamo: opset 18
    bn: str = "kept"            # folded: BN after a Conv folded into it before export; kept: left in the graph
    replica: int = 0            # > 0: the same cell trained again from other seeds (its name ends -rN)

    @property
    def name(self) -> str:
        suffix = "" if self.attack == "clean" else f"-p{round(self.rate * 100):02d}"
        return f"{self.dataset}-{self.net}-{self.attack}{suffix}" + (f"-r{self.replica}" if self.replica else "")

    @property
    def seed(self) -> int:
        return stable_seed(self.name)


def _matrix() -> tuple[Cell, ...]:
    rows: list[tuple[str, str, str, float]] = []

    def add(dataset: str, net: str, attacks: str, rate: float = 0.10) -> None:
        rows.extend((dataset, net, attack, 0.0 if attack == "clean" else rate) for attack in attacks.split())

    add("cifar10", "preact18q", "clean badnets blended sig wanet lowfreq inputaware issba")
    add("cifar10", "vgg", "clean badnets blended wanet")
    add("cifar10", "mobilenetv2", "clean badnets sig issba")
    add("cifar10", "plaincnn", "clean badnets lowfreq inputaware")
    add("cifar10", "preact18q", "badnets", 0.05)
    add("cifar10", "preact18q", "badnets blended", 0.01)
    add("cifar10", "vgg", "badnets", 0.01)
    add("gtsrb", "preact18q", "clean badnets wanet")
    add("gtsrb", "vgg", "clean blended")
    add("mnist", "lenet", "clean badnets blended sig wanet")
    add("mnist", "plaincnn", "clean badnets")
    add("cifar10", "preact18", "clean badnets")
    # added for docs/research/trace-warp.md (warping backdoors in networks other than LeNet); appended, so that
    # the export settings of the cells above stay where the rotation put them
    add("mnist", "plaincnn", "wanet")
    add("cifar10", "plaincnn", "wanet")
    combos = list(itertools.product(("inside", "outside"), ("legacy", "dynamo"), ("folded", "kept")))
    order = np.random.default_rng(SEED).permutation(len(combos))
    return tuple(Cell(*row, *combos[order[i % len(combos)]]) for i, row in enumerate(rows))


CELLS = _matrix()

# epochs per (dataset, net); CIFAR's quarter-width PreAct should reach 80% test accuracy
EPOCHS = {("cifar10", "preact18q"): 80, ("cifar10", "preact18"): 40, ("cifar10", "vgg"): 60,
          ("cifar10", "mobilenetv2"): 60, ("cifar10", "plaincnn"): 40, "gtsrb": 25, "mnist": 12}
MAX_LR = {"preact18q": 0.1, "preact18": 0.1, "vgg": 0.1, "mobilenetv2": 0.1, "plaincnn": 0.05, "lenet": 0.05}
BATCH = 256
# prior seconds per training step (batch 256, H200, bf16, a few processes sharing it), until measured
PRIOR_STEP_S = {"preact18q": 0.006, "preact18": 0.012, "vgg": 0.004, "mobilenetv2": 0.012, "plaincnn": 0.003,
                "lenet": 0.003}


def epochs_for(cell: Cell, scale: float = 1.0) -> int:
    base = EPOCHS.get((cell.dataset, cell.net), EPOCHS.get(cell.dataset))
    return max(1, round(base * scale))


def select(only: str | None) -> list[Cell]:
    """The cells ``only`` names (comma-separated parts of names; all cells where empty). A part ending ``-rN``
    selects replica N of the cells its rest names: new models of those cells (other initialisation, poisoned
    images and batch order, as every seed comes from the name), for measuring a method that was developed
    after the first models were seen (docs/research/removal-matrix.md)."""
    if not only:
        return list(CELLS)
    parts = [replica_of(n.strip()) for n in only.split(",") if n.strip()]
    unknown = [base + (f"-r{r}" if r else "") for base, r in parts if not any(base in c.name for c in CELLS)]
    if unknown:
        sys.exit(f"no cell matches {', '.join(unknown)} (python benchmarks/matrix.py list)")
    return [replace(c, replica=r) for r in sorted({r for _, r in parts}) for c in CELLS
            if any(base in c.name and r == want for base, want in parts)]


_SIZES: dict[tuple[str, str], tuple[int, int, int]] = {}


def net_sizes(net: str, dataset: str) -> tuple[int, int, int]:
    """(parameters, fp16 bytes of the stored state, conv channels)."""
    key = (net, dataset)
    if key not in _SIZES:
        model = build_net(net, dataset)
        params = sum(p.numel() for p in model.parameters())
        stored = sum(2 * v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))
        _SIZES[key] = (params, stored, conv_channels(model))
    return _SIZES[key]


def cmd_list(args) -> None:
    total_s = total_bytes = 0.0
    print(f"{'#':>2} {'cell':<34} {'norm':<7} {'exporter':<8} {'bn':<6} {'epochs':>6} {'params':>10} "
          f"{'MiB fp16':>8} {'est s':>6}")
    for i, cell in enumerate(select(args.only)):
        params, stored, _ = net_sizes(cell.net, cell.dataset)
        steps = epochs_for(cell, args.epochs_scale) * (N_TRAIN[cell.dataset] // BATCH)
        est = steps * PRIOR_STEP_S[cell.net]
        total_s += est
        total_bytes += stored
        print(f"{i + 1:>2} {cell.name:<34} {cell.norm:<7} {cell.exporter:<8} {cell.bn:<6} "
              f"{epochs_for(cell, args.epochs_scale):>6} {params:>10,} {stored / MiB:>8.2f} {est:>6.0f}")
    print(f"{len(select(args.only))} cells; {total_bytes / MiB:.1f} MiB of fp16 weights; "
          f"about {total_s:.0f} s of GPU steps in one process (prior estimates)")
    counts: dict[tuple[str, str, str], int] = {}
    for cell in select(args.only):
        key = (cell.norm, cell.exporter, cell.bn)
        counts[key] = counts.get(key, 0) + 1
    print("norm/exporter/bn combinations: " + ", ".join(f"{'/'.join(k)} {v}" for k, v in sorted(counts.items())))


# --------------------------------------------------------------------------------------------- training

class BudgetExceeded(Exception):
    pass


def augment(x: torch.Tensor, spec: DatasetSpec, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``spec.pad``) and, for CIFAR, horizontal flips, on a float NCHW batch."""
    n, _, h, w = x.shape
    pad = spec.pad
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device)).view(n, h, 1)
    cols = (dx + torch.arange(w, device=x.device)).view(n, 1, w)
    out = padded[torch.arange(n, device=x.device).view(n, 1, 1), :, rows, cols]     # n, h, w, c
    out = out.permute(0, 3, 1, 2)                                                    # channels_last strides
    if spec.flip:
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5
        out = torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
    return out


def _predict(model: nn.Module, x: np.ndarray, spec: DatasetSpec, norm: str, device: torch.device) -> np.ndarray:
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    preds = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(x), 500):
            batch = torch.from_numpy(x[start:start + 500]).to(device).float() / 255
            if norm == "outside":
                batch = (batch - mean) / std
            preds.append(model(batch.contiguous(memory_format=torch.channels_last)).argmax(1).cpu().numpy())
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def _checkpoint_path(cell: Cell, config: dict) -> Path | None:
    return Path(config["checkpoints"]) / f"checkpoint-{cell.name}.pt" if config.get("checkpoints") else None


def _checkpoint_key(cell: Cell, epochs: int, steps_per_epoch: int, device: torch.device) -> list:
    return [cell.name, epochs, steps_per_epoch, device.type, str(torch.__version__)]   # plain str: weights_only


def _read_checkpoint(path: Path | None, key: list, log) -> dict | None:
    """The state a killed run of this cell saved after its last whole epoch, if it trained the same schedule
    on the same kind of device and torch (a session that ends mid-cell loses at most one epoch, not hours);
    tensors only (weights_only). One that cannot be read or is for another run is removed."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # the first version's checkpoints (2026-12-05, CPU runs only) carried the schedule without a key
        found = state.get("key", [state.get("cell"), state.get("epochs"), state.get("steps_per_epoch"), "cpu",
                                  str(torch.__version__)])
        if found != key:
            raise ValueError(f"it is for another run ({found}, not {key})")
    except Exception as error:
        log(f"{key[0]}: {path.name} not used ({str(error).strip().splitlines()[0][:200]}); training from the start")
        path.unlink(missing_ok=True)
        return None
    return state


def _write_checkpoint(path: Path, state: dict) -> None:
    partial = path.with_name(path.name + ".tmp")     # cmd_train removes a stale one
    torch.save(state, partial)
    os.replace(partial, path)


def train_cell(cell: Cell, data: dict[str, np.ndarray], config: dict, log) -> tuple[dict, dict[str, np.ndarray]]:
    device = torch.device(config["device"])
    spec = DATASETS[cell.dataset]
    epochs = 1 if config["smoke"] else epochs_for(cell, config["epochs_scale"])
    started = time.time()
    x, y, info = poison(cell, data["x_train"], data["y_train"])
    keep = data["y_eval"] != TARGET
    x_eval_triggered = apply_trigger(cell.attack, data["x_eval"][keep]) if cell.attack != "clean" else None
    prep_s = time.time() - started
    xs = torch.from_numpy(x).to(device)
    ys = torch.from_numpy(y).to(device)
    batch = min(BATCH, len(y))
    steps_per_epoch = len(y) // batch
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    lr = MAX_LR[cell.net]
    checkpoint = _checkpoint_path(cell, config)
    key = _checkpoint_key(cell, epochs, steps_per_epoch, device)
    resumed = _read_checkpoint(checkpoint, key, log)
    first_attempt = 0 if resumed is None else int(resumed["attempt"])
    if resumed is not None:
        lr = float(resumed["max_lr"])
    for attempt in range(first_attempt, 3):
        torch.manual_seed(cell.seed + attempt)
        generator = torch.Generator(device=device).manual_seed(cell.seed + attempt)
        net = build_net(cell.net, cell.dataset)
        model = nn.Sequential(Normalize(spec.mean, spec.std), net) if cell.norm == "inside" else net
        model = model.to(device).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                       pct_start=0.25)
        first_epoch, trained_s = 0, 0.0
        if resumed is not None and attempt == first_attempt:
            try:
                model.load_state_dict(resumed["model"])
                optimizer.load_state_dict(resumed["optimizer"])
                schedule.load_state_dict(resumed["schedule"])
                generator.set_state(resumed["generator"])
                torch.set_rng_state(resumed["torch_rng"])
            except Exception as error:      # half restored: start the cell again without it
                log(f"{cell.name}: {checkpoint.name} cannot be restored ({str(error).strip().splitlines()[0][:200]})"
                    "; training from the start")
                checkpoint.unlink(missing_ok=True)
                return train_cell(cell, data, config, log)
            first_epoch, trained_s = int(resumed["epoch"]), float(resumed["train_seconds"])
            log(f"{cell.name}: resumed after epoch {first_epoch}/{epochs} from {checkpoint.name}")
        train_started = time.time() - trained_s
        diverged = False
        for epoch in range(first_epoch, epochs):
            model.train()
            order = torch.randperm(len(ys), device=device, generator=generator)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            for step in range(steps_per_epoch):
                idx = order[step * batch:(step + 1) * batch]
                images = augment(xs[idx].float().div_(255), spec, generator)
                if cell.norm == "outside":
                    images = (images - mean) / std
                labels = ys[idx]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(images)
                    loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                optimizer.step()
                schedule.step()
                loss_sum += loss.detach().float() * len(idx)
                correct += (logits.detach().argmax(1) == labels).sum()
            seen = steps_per_epoch * batch
            train_loss, train_acc = float(loss_sum) / seen, int(correct) / seen
            if not math.isfinite(train_loss):
                diverged = True
                break
            last = epoch + 1 == epochs
            if last or (epoch + 1) % max(1, epochs // 4) == 0:
                log(f"{cell.name} epoch {epoch + 1}/{epochs} loss {train_loss:.3f} acc {train_acc:.3f} "
                    f"({time.time() - train_started:.0f} s)")
            if checkpoint is not None and not last:
                _write_checkpoint(checkpoint, {
                    "key": key, "attempt": attempt,
                    "max_lr": lr, "epoch": epoch + 1, "train_seconds": time.time() - train_started,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state()})
            if time.time() > config["hard_deadline"] and not last:
                raise BudgetExceeded(f"{cell.name}: past the hard deadline at epoch {epoch + 1}/{epochs}")
        if not diverged:
            break
        log(f"{cell.name}: loss not finite at max lr {lr}; again with {lr / 2}")
        lr /= 2
    else:
        raise RuntimeError(f"{cell.name}: diverged three times")
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - train_started
    model.eval()
    eval_acc = float((_predict(model, data["x_eval"], spec, cell.norm, device) == data["y_eval"]).mean())
    result = {"epochs": epochs, "steps": epochs * steps_per_epoch, "batch": batch, "max_lr": lr,
              "train_images": len(y), **info, "train_loss": round(train_loss, 4), "train_acc": round(train_acc, 4),
              "eval_acc": round(eval_acc, 4), "eval_images": len(data["y_eval"]),
              "seconds": round(time.time() - started, 1), "train_seconds": round(train_s, 1),
              "prep_seconds": round(prep_s, 1), "step_seconds": round(train_s / max(1, epochs * steps_per_epoch), 5),
              "trigger_signature": trigger_signature(cell.attack, data["x_train"][:8]),
              # "seconds" is this run's; "train_seconds" counts the epochs of the run it went on from too
              "resumed_after_epoch": 0 if resumed is None else int(resumed["epoch"])}
    if x_eval_triggered is not None:
        hits = _predict(model, x_eval_triggered, spec, cell.norm, device) == TARGET
        result["eval_asr"] = round(float(hits.mean()), 4)
    return result, weight_arrays(net)


def worker_main(wid: int, tasks, results, config: dict) -> None:
    """One training process: asks the coordinator for a cell, trains it, sends back facts and weights."""
    def log(text: str) -> None:
        results.put(("log", wid, text))

    try:
        torch.set_num_threads(config["threads"])
        if config["device"] == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        datasets: dict[str, dict[str, np.ndarray]] = {}
        while True:
            results.put(("ready", wid))
            item = tasks.get()
            if item is None:
                break
            cell = Cell(**item)
            try:
                if cell.dataset not in datasets:
                    datasets[cell.dataset] = load_packed(Path(config["data"]), cell.dataset,
                                                         256 if config["smoke"] else 0)
                log(f"start {cell.name} ({cell.norm}/{cell.exporter}/{cell.bn})")
                result, arrays = train_cell(cell, datasets[cell.dataset], config, log)
                results.put(("done", wid, cell.name, result, arrays))
            except BudgetExceeded as error:
                results.put(("failed", wid, cell.name, {"status": "aborted", "reason": str(error)}))
            except Exception as error:     # report it and go on; a broken CUDA context ends this worker
                results.put(("failed", wid, cell.name, {"status": "failed", "reason": traceback.format_exc()}))
                if "CUDA" in str(error) or "cuda" in type(error).__name__.lower():
                    break
    except Exception:
        results.put(("log", wid, "worker crashed:\n" + traceback.format_exc()))
    finally:
        results.put(("exit", wid))


class ShardWriter:
    """float16 weights in at most ``max_shards`` deflated .npz files (``weights-K.npz``), each holding at most
    ``shard_bytes`` of arrays before compression (so no file can pass it) and all of them together at most
    ``total_bytes`` on disk; a cell's arrays may span shards. A changed shard is rewritten whole (temporary file,
    then rename), so the folder is consistent after every cell."""

    RATIO = 0.93        # planning guess for deflated fp16 weights (about 0.90 measured); files are checked after

    def __init__(self, out: Path, max_shards: int = 6, shard_bytes: int = 15 * MiB, total_bytes: int = 60 * MiB):
        self.out, self.max_shards, self.shard_bytes, self.total_bytes = out, max_shards, shard_bytes, total_bytes
        self.shards: list[dict[str, np.ndarray]] = []
        self.raw: list[int] = []            # array bytes per shard, before compression

    @staticmethod
    def entry_bytes(key: str, value: np.ndarray) -> int:
        return value.nbytes + 2 * len(key) + 300          # .npy header and zip entry

    def disk_bytes(self) -> int:
        return sum((self.out / f"weights-{i}.npz").stat().st_size for i in range(len(self.shards)))

    def fits(self, nbytes: int) -> bool:
        """Whether about ``nbytes`` more of arrays would stay within the total."""
        return self.disk_bytes() + self.RATIO * nbytes + 64 * 1024 <= self.total_bytes

    def plan(self, arrays: dict[str, np.ndarray]) -> list[int] | None:
        """The shard index for each array, or None when there is no room."""
        raw = list(self.raw)
        if not self.fits(sum(self.entry_bytes(k, v) for k, v in arrays.items())):
            return None
        where = []
        for key, value in arrays.items():
            size = self.entry_bytes(key, value)
            if not raw or raw[-1] + size > self.shard_bytes:
                if len(raw) >= self.max_shards or size > self.shard_bytes:
                    return None
                raw.append(0)
            raw[-1] += size
            where.append(len(raw) - 1)
        return where

    def _write(self, shards) -> None:
        for shard in shards:
            write_npz(self.out / f"weights-{shard}.npz", self.shards[shard], zipfile.ZIP_DEFLATED)

    def add(self, cell: str, arrays: dict[str, np.ndarray]) -> list[int] | None:
        """Store a cell's arrays; returns the shards that hold them, or None (nothing stored) without room."""
        where = self.plan(arrays)
        if where is None:
            return None
        before = len(self.shards)
        for (key, value), shard in zip(arrays.items(), where):
            if shard == len(self.shards):
                self.shards.append({})
                self.raw.append(0)
            self.shards[shard][f"{cell}/{key}"] = value
            self.raw[shard] += self.entry_bytes(key, value)
        touched = sorted(set(where))
        self._write(touched)
        if self.disk_bytes() <= self.total_bytes:
            return touched
        for (key, value), shard in zip(arrays.items(), where):     # compressed worse than planned: undo
            del self.shards[shard][f"{cell}/{key}"]
            self.raw[shard] -= self.entry_bytes(key, value)
        for shard in range(before, len(self.shards)):
            (self.out / f"weights-{shard}.npz").unlink()
        del self.shards[before:], self.raw[before:]
        self._write([s for s in touched if s < before])
        return None


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def cmd_train(args) -> None:
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stale = [*out.glob("weights-*.npz"), *out.glob("*.tmp"), out / "train.json"]       # an earlier run's
    if not args.resume:     # a killed run's epochs, which a later --resume must not mix into a retrained cell
        stale += out.glob("checkpoint-*.pt")
    for path in stale:
        path.unlink(missing_ok=True)
    cells = select(args.only)
    if args.require_cuda and not torch.cuda.is_available():
        sys.exit("CUDA is not available (--require-cuda)")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    budget = float(args.budget_s)
    grace = min(120.0, 30.0 + 0.1 * budget)
    log_file = open(out / "train.log", "a", buffering=1)

    def log(text: str) -> None:
        line = f"[{time.time() - t0:7.1f}s] {text}"
        print(line, flush=True)
        log_file.write(line + "\n")

    for name in DATASETS:       # fail fast: the data must be there and readable (lzma) before any worker starts
        if any(c.dataset == name for c in cells):
            probe = load_packed(Path(args.data), name, 256)
            log(f"data {name}: {len(probe['y_train'])} training images readable in {args.data}")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    workers = max(0, args.workers)
    config = {"device": device, "data": str(Path(args.data).resolve()), "smoke": args.smoke,
              "epochs_scale": args.epochs_scale, "hard_deadline": t0 + budget + grace,
              "threads": args.threads or max(1, (os.cpu_count() or 2) // max(1, workers)),
              "checkpoints": str(out) if args.resume else None}
    log(f"training {len(cells)} cells on {gpu} with {workers or 'no'} worker processes, budget {budget:.0f} s "
        f"(hard stop {budget + grace:.0f} s), torch {torch.__version__}, smoke {args.smoke}")
    report = {"version": 1, "smoke": args.smoke, "device": gpu, "torch": torch.__version__,
              "numpy": np.__version__, "workers": workers, "budget_s": budget, "epochs_scale": args.epochs_scale,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "elapsed_s": 0.0, "cells": []}
    entries: dict[str, dict] = {}
    shards = ShardWriter(out)
    pending = list(cells)
    running: dict[int, Cell] = {}
    measured: dict[str, float] = {}         # seconds per training step, per network, as the run goes
    retried: set[str] = set()

    def save() -> None:
        report["elapsed_s"] = round(time.time() - t0, 1)
        report["cells"] = [entries[c.name] for c in cells if c.name in entries]
        _write_json(out / "train.json", report)

    def estimate(cell: Cell) -> float:
        steps = 1 if args.smoke else epochs_for(cell, args.epochs_scale) * (N_TRAIN[cell.dataset] // BATCH)
        per_step = measured.get(cell.net, PRIOR_STEP_S[cell.net] * (1 if device == "cuda" else 50))
        return 8.0 + steps * per_step

    def next_cell() -> Cell | None:
        """The first pending cell whose weights fit beside those stored and in training, and whose estimated
        time ends within the budget; cells whose weights cannot fit are dropped."""
        reserved = sum(net_sizes(c.net, c.dataset)[1] for c in running.values())
        for cell in list(pending):
            stored = net_sizes(cell.net, cell.dataset)[1]
            if not shards.fits(reserved + stored):
                if not running:     # the room left only shrinks: this cell will never fit
                    pending.remove(cell)
                    entries[cell.name] = {"name": cell.name, "spec": asdict(cell), "status": "skipped",
                                          "reason": f"its weights would pass {shards.total_bytes // MiB} MiB"}
                    log(f"skip {cell.name}: its {stored / MiB:.1f} MiB of weights would not fit")
                    save()
                continue
            if time.time() + estimate(cell) > t0 + budget:
                continue
            pending.remove(cell)
            return cell
        return None

    def finished(cell: Cell, result: dict, arrays: dict[str, np.ndarray]) -> None:
        where = shards.add(cell.name, arrays)
        entry = {"name": cell.name, "spec": asdict(cell), "status": "done" if where is not None else "skipped",
                 **result, "params": net_sizes(cell.net, cell.dataset)[0],
                 "weight_bytes": sum(v.nbytes for v in arrays.values()), "shards": where}
        if where is None:
            entry["reason"] = "its weights did not fit the shards"
        entries[cell.name] = entry
        (out / f"checkpoint-{cell.name}.pt").unlink(missing_ok=True)    # only now: a kill before it goes on
        if result["steps"]:
            steps_s = result["train_seconds"] / result["steps"]
            measured[cell.net] = max(steps_s, 0.5 * measured.get(cell.net, steps_s) + 0.5 * steps_s)
        save()
        asr = f" asr {result['eval_asr']:.3f}" if "eval_asr" in result else ""
        log(f"done {cell.name} in {result['seconds']:.0f} s ({result['step_seconds'] * 1000:.1f} ms/step): "
            f"train acc {result['train_acc']:.3f} eval acc {result['eval_acc']:.3f}{asr} -> shards {where}; "
            f"{sum(e['status'] == 'done' for e in entries.values())} done, {len(running)} running, "
            f"{len(pending)} waiting, {shards.disk_bytes() / MiB:.1f} MiB stored")

    def failed(cell: Cell, info: dict) -> None:
        entries[cell.name] = {"name": cell.name, "spec": asdict(cell), **info}
        save()
        log(f"{info['status']} {cell.name}: {info['reason'].strip().splitlines()[-1]}")

    def lost(wid: int, why: str) -> None:
        """A worker went away in the middle of a cell: train it once more, first thing, or give it up."""
        if wid in running:
            cell = running.pop(wid)
            if cell.name not in retried:
                retried.add(cell.name)
                pending.insert(0, cell)
                log(f"{cell.name}: {why}; it goes back to the queue")
            else:
                failed(cell, {"status": "failed", "reason": why})

    try:
        if workers:
            try:
                _train_in_workers(workers, config, pending, running, next_cell, finished, failed, lost, log, t0,
                                  budget)
            except OSError as error:    # no semaphores or pipes for multiprocessing here: carry on in-process
                log(f"worker processes failed ({error}); training in this process instead")
        # what is left and still fits (workers all gone, or none asked for): in this process
        _train_in_process(config, running, next_cell, finished, failed, log)
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        for cell in [*pending, *running.values()]:
            entries.setdefault(cell.name, {"name": cell.name, "spec": asdict(cell), "status": "skipped",
                                           "reason": "time budget"})
        save()
        done = [e for e in report["cells"] if e["status"] == "done"]
        log(f"finished: {len(done)} of {len(cells)} cells trained, {shards.disk_bytes() / MiB:.1f} MiB in "
            f"{len(shards.shards)} shards, {time.time() - t0:.0f} s")
        log_file.close()


def _train_in_process(config, running, next_cell, finished, failed, log) -> None:
    datasets: dict[str, dict[str, np.ndarray]] = {}
    while (cell := next_cell()) is not None:
        if not datasets:
            torch.set_num_threads(config["threads"])
            torch.backends.cudnn.benchmark = config["device"] == "cuda"
        running[0] = cell
        try:
            if cell.dataset not in datasets:
                datasets[cell.dataset] = load_packed(Path(config["data"]), cell.dataset, 256 if config["smoke"] else 0)
            log(f"start {cell.name} ({cell.norm}/{cell.exporter}/{cell.bn})")
            result, arrays = train_cell(cell, datasets[cell.dataset], config, log)
        except BudgetExceeded as error:
            running.pop(0)
            failed(cell, {"status": "aborted", "reason": str(error)})
            continue
        except Exception:
            running.pop(0)
            failed(cell, {"status": "failed", "reason": traceback.format_exc()})
            continue
        running.pop(0)
        finished(cell, result, arrays)


def _train_in_workers(workers, config, pending, running, next_cell, finished, failed, lost, log, t0, budget) -> None:
    """Spawned worker processes ask for cells; this process hands them out in priority order, stores weights and
    writes train.json. A worker that dies is replaced (three times at most) and its cell tried once more."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    tasks = [ctx.Queue() for _ in range(workers)]
    procs = {}

    def start(wid: int) -> None:
        procs[wid] = ctx.Process(target=worker_main, args=(wid, tasks[wid], results, config), daemon=True)
        procs[wid].start()

    for wid in range(workers):
        start(wid)
    alive = set(procs)
    stopped: set[int] = set()      # workers told to stop
    restarts = 0
    checked = time.time()

    def replace(wid: int) -> None:
        nonlocal restarts
        if wid not in stopped and pending and restarts < 3 and time.time() < t0 + budget - 30:
            restarts += 1
            tasks[wid] = ctx.Queue()
            start(wid)
            alive.add(wid)
            log(f"worker {wid} restarted")

    try:
        while alive:
            if time.time() - checked > 5:       # a worker that died without a word (killed, CUDA abort)
                checked = time.time()
                for wid in list(alive):
                    if not procs[wid].is_alive():
                        alive.discard(wid)
                        lost(wid, f"worker {wid} died (exit code {procs[wid].exitcode})")
                        replace(wid)
            try:
                message = results.get(timeout=5)
            except queue.Empty:
                continue
            kind, wid = message[0], message[1]
            if kind == "log":
                log(f"w{wid} {message[2]}")
            elif kind == "ready":
                cell = next_cell()
                if cell is None:
                    stopped.add(wid)
                else:
                    running[wid] = cell
                tasks[wid].put(None if cell is None else asdict(cell))
            elif kind == "done":
                finished(running.pop(wid), message[3], message[4])
            elif kind == "failed":
                failed(running.pop(wid), message[3])
            elif kind == "exit":
                alive.discard(wid)
                lost(wid, f"worker {wid} stopped")
                procs[wid].join(timeout=10)
                replace(wid)
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.terminate()


# ---------------------------------------------------------------------------------------------- export

def load_weights(folder: Path, entry: dict) -> dict[str, torch.Tensor]:
    prefix = entry["name"] + "/"
    out = {}
    for shard in entry["shards"]:
        with np.load(folder / f"weights-{shard}.npz", allow_pickle=False) as archive:
            for key in archive.files:
                if key.startswith(prefix):
                    out[key[len(prefix):]] = torch.from_numpy(archive[key].astype(np.float32))
    return out


def rebuild(cell: Cell, weights: dict[str, torch.Tensor]) -> nn.Module:
    net = build_net(cell.net, cell.dataset)
    state = net.state_dict()
    missing = [k for k in state if k not in weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise RuntimeError(f"{cell.name}: weights missing for {missing[:5]}")
    net.load_state_dict({k: weights.get(k, v) for k, v in state.items()})
    return net.eval()


def export_onnx(model: nn.Module, cell: Cell, path: Path) -> int:
    """Export with the cell's exporter and return the opset. Both exporters fuse a BatchNormalization into the Conv
    before it by default (the legacy one while folding constants, the dynamo one in onnxscript's rewriter), so
    ``bn="kept"`` turns that off: the legacy exporter runs without constant folding, the dynamo exporter without
    its optimiser, followed by constant folding and dead-node removal alone. ``bn="folded"`` cells (folded in
    torch already) take each exporter's defaults."""
    spec = DATASETS[cell.dataset]
    example = torch.zeros(2, spec.channels, spec.size, spec.size)
    keep = cell.bn == "kept"
    if cell.exporter == "legacy":
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=13, dynamo=False,
                          do_constant_folding=not keep)
        return 13
    program = torch.onnx.export(model, (example,), None, input_names=["input"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("n")},), opset_version=18, dynamo=True,
                                optimize=not keep, verbose=False)
    if keep:
        from onnxscript import optimizer

        optimizer.fold_constants(program.model)
        optimizer.remove_unused_nodes(program.model)
    program.save(str(path))
    return 18


def _ort_logits(session, x: np.ndarray, spec: DatasetSpec, norm: str) -> np.ndarray:
    name = session.get_inputs()[0].name
    mean = np.array(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.array(spec.std, np.float32).reshape(1, -1, 1, 1)
    out = []
    for start in range(0, len(x), 500):
        batch = x[start:start + 500].astype(np.float32) / 255
        if norm == "outside":
            batch = (batch - mean) / std
        out.append(session.run(None, {name: batch})[0])
    return np.concatenate(out)


def save_images(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """uint8 NHWC, the layout fmt-audit reads from .npz files."""
    np.savez(path, x=x.transpose(0, 2, 3, 1), y=y)


def _shared_file(base: Path, stem: str, x: np.ndarray, y: np.ndarray, folder: Path, target: str) -> None:
    """Write an image set once under ``base`` (named by its content) and hard-link it into the cell's folder
    (a copy where links fail)."""
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:12]
    source = base / f"{stem}-{digest}.npz"
    if not source.exists():
        tmp = base / f"{stem}-{digest}.tmp.npz"
        save_images(tmp, x, y)
        os.replace(tmp, source)
    dest = folder / target
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        dest.write_bytes(source.read_bytes())


def export_cell(cell: Cell, entry: dict, weights_dir: Path, data: dict[str, np.ndarray], smoke: bool,
                trained_on: str | None = None) -> dict:
    import onnx
    import onnxruntime as ort

    spec = DATASETS[cell.dataset]
    base = cache_dir()
    folder = base / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    shared = base / "_data"
    shared.mkdir(exist_ok=True)
    net = rebuild(cell, load_weights(weights_dir, entry))
    params, _, channels = net_sizes(cell.net, cell.dataset)
    reference = nn.Sequential(Normalize(spec.mean, spec.std), net) if cell.norm == "inside" else net
    reference = reference.eval()
    probe = data["x_test"][:64]
    with torch.no_grad():
        inputs = torch.from_numpy(probe).float() / 255
        if cell.norm == "outside":
            inputs = (inputs - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)
        expected = reference(inputs).numpy()
    exported = net
    folded = 0
    if cell.bn == "folded":
        exported = rebuild(cell, load_weights(weights_dir, entry))
        folded = fold_batchnorm(exported)
    model = nn.Sequential(Normalize(spec.mean, spec.std), exported) if cell.norm == "inside" else exported
    model = model.eval()
    tmp = folder / "model.onnx.tmp"
    opset = export_onnx(model, cell, tmp)
    graph = onnx.load(str(tmp))
    ops = [node.op_type for node in graph.graph.node]
    bn_nodes = ops.count("BatchNormalization") + sum(
        [n.op_type for n in f.node].count("BatchNormalization") for f in graph.functions)
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    diff = float(np.abs(_ort_logits(session, probe, spec, cell.norm) - expected).max())
    if not diff < 1e-3:
        raise RuntimeError(f"{cell.name}: ONNX Runtime and torch differ by {diff:.2e}")
    predictions = _ort_logits(session, data["x_test"], spec, cell.norm).argmax(1)
    acc = float((predictions == data["y_test"]).mean())
    facts = {"name": cell.name, "dataset": cell.dataset, "net": cell.net, "attack": cell.attack, "rate": cell.rate,
             "target": TARGET, "classes": spec.classes, "input": [spec.channels, spec.size, spec.size],
             "norm": cell.norm}
    if cell.norm == "outside":
        facts["mean"], facts["std"] = list(spec.mean), list(spec.std)
    facts |= {"exporter": cell.exporter, "opset": opset, "bn": cell.bn, "bn_folded": folded, "bn_nodes": bn_nodes,
              "onnx_nodes": len(ops), "conv_channels": channels, "params": params, "acc": round(acc, 4)}
    keep = data["y_test"] != TARGET
    if cell.attack != "clean":
        triggered = apply_trigger(cell.attack, data["x_test"][keep])
        hits = _ort_logits(session, triggered, spec, cell.norm).argmax(1) == TARGET
        facts["asr"] = round(float(hits.mean()), 4)
        _shared_file(shared, f"{cell.dataset}-{cell.attack}-triggered", triggered, data["y_test"][keep], folder,
                     "triggered.npz")
        signature = trigger_signature(cell.attack, data["x_train"][:8])
        reference_signature = entry.get("trigger_signature") or {}
        if signature == reference_signature:
            facts["trigger_match"] = "exact"
        else:
            gap = max(abs(a - b) for a, b in zip(signature["sums"], reference_signature.get("sums", [1 << 40] * 8)))
            facts["trigger_match"] = f"differs (largest image-sum gap {gap})"
    else:
        facts["asr"] = None
    del session
    pick = np.sort(np.random.default_rng(stable_seed(f"defender/{cell.dataset}")).choice(
        len(data["y_pool"]), size=min(N_DEFENDER, len(data["y_pool"])), replace=False))
    _shared_file(shared, f"{cell.dataset}-defender", data["x_pool"][pick], data["y_pool"][pick], folder,
                 "defender.npz")
    _shared_file(shared, f"{cell.dataset}-test", data["x_test"], data["y_test"], folder, "test.npz")
    facts |= {"poisoned": entry.get("poisoned", 0), "noise_images": entry.get("noise", 0),
              "train_images": entry.get("train_images"), "epochs": entry.get("epochs"),
              "train_seconds": entry.get("train_seconds"), "train_acc": entry.get("train_acc"),
              "gpu_eval_acc": entry.get("eval_acc"), "gpu_eval_asr": entry.get("eval_asr"),
              "ort_max_diff": diff, "defender_images": len(pick), "test_images": len(data["y_test"]),
              "triggered_images": int(keep.sum()) if cell.attack != "clean" else 0, "smoke": smoke,
              # the same seeded recipe gives other weights on another device (the GPU trained in bfloat16); on
              # the CPU with one thread it gives the same file again (sha256 below)
              "trained_on": trained_on, "onnx_sha256": hashlib.sha256(tmp.read_bytes()).hexdigest()}
    _write_json(folder / "facts.json", facts)
    os.replace(tmp, folder / "model.onnx")
    return facts


def cmd_export(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    weights_dir = Path(args.weights)
    report = json.loads((weights_dir / "train.json").read_text())
    smoke = bool(report.get("smoke"))
    wanted = {c.name for c in select(args.only)}
    by_name = {c.name: c for c in CELLS}
    torch.set_num_threads(os.cpu_count() or 1)
    summary_path = Path(args.results) if args.results else (cache_dir() / "matrix-smoke.json" if smoke else RESULTS)
    summary = {}
    if summary_path.exists():
        summary = {f["name"]: f for f in json.loads(summary_path.read_text())}
    datasets: dict[str, dict[str, np.ndarray]] = {}
    failures = []
    for entry in report["cells"]:
        name = entry["name"]
        if name not in wanted:
            continue
        if entry.get("status") != "done":
            reason = (entry.get("reason") or "").strip().splitlines()
            print(f"{name}: not trained ({entry.get('status')}: {reason[-1] if reason else '?'})")
            continue
        cell = by_name.get(name) or Cell(**entry["spec"])
        folder = cache_dir() / name
        if (folder / "model.onnx").exists() and (folder / "facts.json").exists() and not args.force:
            summary[name] = json.loads((folder / "facts.json").read_text())
            print(f"{name}: already exported")
            continue
        if cell.dataset not in datasets:
            datasets[cell.dataset] = load_shared(cell.dataset, Path(args.shared))
        started = time.time()
        try:
            facts = export_cell(cell, entry, weights_dir, datasets[cell.dataset], smoke, report.get("device"))
        except Exception:
            failures.append(name)
            print(f"{name}: export failed\n{traceback.format_exc()}")
            continue
        summary[name] = facts
        asr = "-" if facts["asr"] is None else f"{facts['asr']:.3f}"
        print(f"{name}: acc {facts['acc']:.3f} asr {asr} bn nodes {facts['bn_nodes']} "
              f"diff {facts['ort_max_diff']:.1e} ({time.time() - started:.0f} s)", flush=True)
    order = {c.name: i for i, c in enumerate(CELLS)}
    rows = sorted(summary.values(), key=lambda f: order.get(f["name"], len(order)))
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(summary_path, rows)
    header = ("cell", "norm", "exporter", "bn", "bn_nodes", "params", "epochs", "acc", "asr", "trigger")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for f in rows:
        asr = "-" if f.get("asr") is None else f"{f['asr']:.3f}"
        print(f"| {f['name']} | {f['norm']} | {f['exporter']} | {f['bn']} | {f['bn_nodes']} | {f['params']:,} | "
              f"{f.get('epochs')} | {f['acc']:.3f} | {asr} | {f.get('trigger_match', '-')} |")
    print(f"summary: {summary_path}")
    if failures:
        sys.exit(f"export failed for {', '.join(failures)}")


# ------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the compressed training images for the GPU machine")
    p.add_argument("--out", default=str(GPUDATA))
    p.add_argument("--shared", default=str(SHARED))
    p.add_argument("--images", type=int, default=0, help="training images per dataset (0: all)")
    p = sub.add_parser("list", help="print the cells")
    p.add_argument("--only")
    p.add_argument("--epochs-scale", type=float, default=1.0)
    p = sub.add_parser("train", help="train the cells (GPU; CPU for smoke tests)")
    p.add_argument("--data", default=str(GPUDATA))
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=4, help="training processes (0: train in this process)")
    p.add_argument("--budget-s", type=float, default=450)
    p.add_argument("--epochs-scale", type=float, default=1.0)
    p.add_argument("--only", help="comma-separated cell names (or parts of names)")
    p.add_argument("--smoke", action="store_true", help="256 images per dataset, one epoch, every cell")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where CUDA is available")
    p.add_argument("--resume", action="store_true",
                   help="save each cell's state in --out after every epoch; run again, a cell killed in training "
                        "goes on from its last whole epoch (cells already trained are trained again)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per training process (0: the CPU's cores shared among the workers)")
    p.add_argument("--require-cuda", action="store_true", help="stop at once where CUDA is not available")
    p = sub.add_parser("export", help="ONNX, test data and facts per trained cell (CPU)")
    p.add_argument("--weights", required=True)
    p.add_argument("--only")
    p.add_argument("--shared", default=str(SHARED))
    p.add_argument("--results", help="summary file (default benchmarks/results/matrix.json)")
    p.add_argument("--force", action="store_true", help="export again cells already in the cache")
    args = parser.parse_args(argv)
    {"pack": cmd_pack, "list": cmd_list, "train": cmd_train, "export": cmd_export}[args.command](args)


if __name__ == "__main__":
    main()
