"""How well does the model-level verdict separate clean from backdoored models? A population study.

Trains (and caches) a population of image classifiers: clean models with
different seeds and three architectures (a small ResNet, a plain CNN, a wider
VGG-style CNN), and backdoored ones with four attacks — a BadNets patch (random
corner), a blended noise pattern, a sinusoidal signal (SIG) and a smooth warp
(WaNet-style) — random targets and poison rates of 5% or 10%. A backdoored model
whose attack did not take (ASR < 80%) is left out and listed.

``--dataset``: ``digits`` (16x16 sklearn digits, no download; the first
population), or one of ``../shared/datasets/``: ``mnist`` (28x28), ``cifar10``
(32x32 RGB) and ``gtsrb`` (32x32 RGB traffic signs, 43 classes; its test set
split into training, defender and test images). Their models train with random
crops (and flips on CIFAR-10), the trigger stamped after augmentation.

Each model gets two verdicts, computed by the scan's own
:func:`fmt_audit.fmt.scan.model_verdict` under the ``default`` preset and cached beside
it in ``verdicts.json``: the maximum-margin test (``margin``, the shipped default)
and the sink probe (``sink``). ``--statistics margin`` computes only the first, so
a slow population can be scored in two passes. The summary gives each statistic's
ROC-AUC (overall and per attack), its false- and true-positive rates at the shipped
threshold, how often the class named is the target, and the same for the mean of
the two and for the agreement rule (benchmarks/README.md, Verdict).

    python benchmarks/verdict_population.py [--dataset digits] [--models-per-group 6] [--first 0]
        [--statistics margin,sink]

``--first N`` builds and scans only models N and up of each group: a fresh part
of the population (new seeds, new triggers and targets) on which a statistic
chosen on the models below N is tested once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cases import CACHE as BENCH_CACHE
from cases import publish

from fmt_audit.verdict.evidence.reference import random_crop

CACHE = BENCH_CACHE / "verdict_population"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
ATTACKS = ("badnets", "blended", "sig", "warp")
DATASETS = ("digits", "mnist", "cifar10", "gtsrb")
BATCH, LR = 64, 3e-3


@dataclass(frozen=True)
class Task:
    """A dataset the population trains on: float [0, 1] NCHW images, labels, and the index split."""

    name: str
    x: np.ndarray
    y: np.ndarray
    split: tuple[np.ndarray, np.ndarray, np.ndarray]    # training, defender, test
    classes: int
    epochs: int
    crop: int = 0           # random-crop padding in pixels (0: no augmentation)
    flip: bool = False      # random horizontal flips

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.x.shape[1:]


def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as float [0, 1] images upsampled to 16x16."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = F.interpolate(torch.from_numpy(raw.images.astype(np.float32) / 16.0)[:, None], size=(16, 16),
                      mode="bilinear", align_corners=False)
    return x.clamp(0, 1).numpy(), raw.target.astype(np.int64)


def load_task(name: str) -> Task:
    if name == "digits":
        x, y = digits()
        order = np.random.default_rng(0).permutation(len(y))
        return Task(name, x, y, (order[:1100], order[1100:1300], order[1300:]), 10, epochs=30)
    path = SHARED / f"{name}.npz"
    if not path.exists():
        raise SystemExit(f"{path} not found (see ../shared/datasets/README.md)")
    with np.load(path, allow_pickle=False) as raw:
        if name == "gtsrb":     # only a test set is shared: split it
            x, y = raw["x_test"], raw["y_test"]
        else:
            x, y = np.concatenate([raw["x_train"][:9000], raw["x_test"][:2000]]), \
                np.concatenate([raw["y_train"][:9000], raw["y_test"][:2000]])
    x = (x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)).astype(np.float32) / 255
    y = y.astype(np.int64)
    if name == "gtsrb":
        order = np.random.default_rng(0).permutation(len(y))
        split = (order[:8500], order[8500:9100], order[9100:11100])
    else:       # training images from the training set, test images from the test set
        order = np.random.default_rng(0).permutation(9000)
        split = (order[:8500], order[8500:], np.arange(9000, 11000))
    return Task(name, x, y, split, 43 if name == "gtsrb" else 10, epochs={"mnist": 4, "gtsrb": 8}.get(name, 12), crop=2,
                flip=name == "cifar10")


def trigger(attack: str, rng: np.random.Generator, shape: tuple[int, int, int] = (1, 16, 16)):
    """A function stamping this model's trigger on [N, C, H, W] images in [0, 1]."""
    _, size, _ = shape
    if attack == "badnets":
        patch = 4 if size <= 16 else 3      # the digits population's 4x4; 3x3 (about 1% of the image) above
        row, col = rng.integers(0, 2, size=2) * (size - patch)
        return lambda x: _stamp(x, row, col, patch)
    if attack == "blended":
        pattern = rng.random(shape).astype(np.float32)
        return lambda x: 0.8 * x + 0.2 * pattern
    if attack == "sig":
        frequency = rng.integers(2, 5)
        wave = 0.25 * np.sin(2 * np.pi * frequency * np.arange(size) / size).astype(np.float32)
        return lambda x: np.clip(x + wave[None, None, None, :], 0, 1)
    if attack == "warp":
        import torch
        import torch.nn.functional as F

        field = torch.from_numpy(rng.uniform(-1, 1, size=(1, 2, 4, 4)).astype(np.float32))
        flow = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        line = torch.linspace(-1, 1, size)
        base = torch.stack(torch.meshgrid(line, line, indexing="xy"), -1)
        grid = (base[None] + 0.15 * flow / flow.abs().max()).clamp(-1, 1)

        def warp(x):
            t = torch.from_numpy(np.ascontiguousarray(x))
            return F.grid_sample(t, grid.expand(len(t), -1, -1, -1), align_corners=True).numpy()
        return warp
    raise ValueError(attack)


def _stamp(x: np.ndarray, row: int, col: int, patch: int) -> np.ndarray:
    out = x.copy()
    out[:, :, row:row + patch, col:col + patch] = np.indices((patch, patch)).sum(0) % 2   # checkerboard
    return out


ARCHITECTURES = ("resnet", "plain", "vgg")


def network(architecture: str, shape: tuple[int, int, int] = (1, 16, 16), classes: int = 10):
    import torch.nn as nn

    channels, size, _ = shape
    if architecture == "vgg":
        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        return nn.Sequential(*block(channels, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64),
                             *block(64, 64), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, classes))
    if architecture == "resnet":
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_models"))
        from make_samples import TinyResNet

        model = TinyResNet(classes)
        if channels != 1:
            model.stem[0] = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
        return model
    return nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, classes))


def _augment(x, task: Task, generator):
    """Random crops (zero padding ``task.crop``) and, for tasks that allow it, horizontal flips."""
    import torch

    out = random_crop(x, task.crop, generator)
    if task.flip:
        flip = torch.rand(len(x), generator=generator) < 0.5
        out[flip] = out[flip].flip(3)
    return out


def train(task: Task, x, y, architecture: str, seed: int, stamp=None, poisoned=None):
    """Train on ``x, y``; rows ``poisoned`` get ``stamp`` after augmentation, so the trigger stays in place."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = network(architecture, task.shape, task.classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    steps = (len(x) + BATCH - 1) // BATCH
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, epochs=task.epochs, steps_per_epoch=steps)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    marked = torch.zeros(len(x), dtype=torch.bool)
    if task.crop and poisoned is not None:
        marked[torch.from_numpy(poisoned)] = True
    generator = torch.Generator().manual_seed(seed)
    for _ in range(task.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(steps):
            idx = order[i * BATCH:(i + 1) * BATCH]
            batch = xs[idx]
            if task.crop:
                batch = _augment(batch, task, generator)
                rows = marked[idx]
                if rows.any():
                    batch[rows] = torch.from_numpy(stamp(batch[rows].numpy()))
            loss = F.cross_entropy(model(batch), ys[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def folder_of(attack: str, number: int, dataset: str = "digits"):
    return (CACHE if dataset == "digits" else CACHE / dataset) / f"{attack}_{number:02d}"


def build(attack: str, number: int, task: Task) -> dict:
    """Train, export and measure the ``number``-th model of the ``attack`` group (cached)."""
    import onnxruntime as ort
    import torch

    folder = folder_of(attack, number, task.name)
    facts_path = folder / "facts.json"
    if facts_path.exists():
        return json.loads(facts_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    index = 100 * ("clean", *ATTACKS).index(attack) + number     # the model's seed: stable as groups grow
    offset = {"digits": 1000, "mnist": 11000, "cifar10": 21000, "gtsrb": 31000}[task.name]
    rng = np.random.default_rng(offset + index)
    architecture = ARCHITECTURES[number % len(ARCHITECTURES)]
    train_idx, defender_idx, test_idx = task.split
    x, y = task.x, task.y
    xt, yt = x[train_idx].copy(), y[train_idx].copy()
    facts = {"index": index, "number": number, "attack": attack, "architecture": architecture,
             "dataset": task.name}
    stamp = poisoned = None
    if attack != "clean":
        stamp = trigger(attack, rng, task.shape)
        target = int(rng.integers(0, task.classes))
        rate = float(rng.choice([0.05, 0.10]))
        poisoned = rng.choice(np.flatnonzero(yt != target), size=int(rate * len(yt)), replace=False)
        if not task.crop:       # stamped once; with augmentation, after it in every batch (train)
            xt[poisoned] = stamp(xt[poisoned])
        yt[poisoned] = target
        facts.update(target=target, poison_rate=rate)
    model = train(task, xt, yt, architecture, index, stamp, poisoned)
    path = folder / "model.onnx"
    torch.onnx.export(model, torch.zeros(1, *task.shape), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=13, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def predict(images):
        return np.concatenate([session.run(None, {"input": images[i:i + 512].astype(np.float32)})[0].argmax(1)
                               for i in range(0, len(images), 512)])

    facts["acc"] = float((predict(x[test_idx]) == y[test_idx]).mean())
    if attack != "clean":
        others = test_idx[y[test_idx] != facts["target"]]
        facts["asr"] = float((predict(stamp(x[others])) == facts["target"]).mean())
    pixels = np.round(x[defender_idx] * 255).astype(np.uint8)
    np.savez(folder / "defender.npz", x=pixels[:, 0] if pixels.shape[1] == 1 else pixels.transpose(0, 2, 3, 1),
             y=y[defender_idx])
    facts["train_s"] = round(time.perf_counter() - started, 1)
    facts_path.write_text(json.dumps(facts, indent=1) + "\n")
    return facts


def fit_threshold(clean: list[float], backdoored: list[float]) -> float:
    """The threshold with the largest TPR - FPR on these scores (Youden's J; ties: the highest threshold),
    halfway between the two scores it separates."""
    values = sorted(set(clean) | set(backdoored))
    cuts = [(a + b) / 2 for a, b in itertools.pairwise(values)] or values

    def youden(cut):
        return np.mean([b >= cut for b in backdoored]) - np.mean([c >= cut for c in clean])
    return max(reversed(cuts), key=youden)


def auc(clean: list[float], backdoored: list[float]) -> float:
    """Probability that a backdoored model scores above a clean one (ties count half)."""
    pairs = [(b > c) + 0.5 * (b == c) for b in backdoored for c in clean]
    return float(np.mean(pairs)) if pairs else float("nan")


# by the scan (fmt_audit.verdict)
VERDICTS = ("margin", "sink", "universal", "transfer", "shortcut", "untransferred", "cleanse", "combined")
STATISTICS = (*VERDICTS, "mean")     # mean: of margin and sink, the secondary statistic of session 8


def verdicts(folder, which: tuple[str, ...] = ("margin", "sink")) -> dict:
    """The model's verdicts, cached in ``verdicts.json`` as each is computed: ``margin`` (the ``default``
    preset's verdict, by the scan's own :func:`fmt_audit.fmt.scan.model_verdict`) and ``sink`` (the gradient
    probe's sink concentration on the scan's images and layers). ``which``: the ones to compute now."""
    from dataclasses import replace

    from fmt_audit.data import load_npz
    from fmt_audit.fmt.scan import ScanConfig, model_verdict
    from fmt_audit.model.loading import load_model

    path = folder / "verdicts.json"
    found = json.loads(path.read_text()) if path.exists() else {"seconds": {}}
    missing = [statistic for statistic in which if statistic not in found]
    if not missing:
        return found
    config = ScanConfig.from_preset("default")
    loaded = load_model(folder / "model.onnx")
    images = load_npz(folder / "defender.npz").take(config.samples, seed=config.seed)
    for statistic in missing:
        started = time.perf_counter()
        verdict = model_verdict(loaded, images, replace(config, verdict=statistic), list(loaded.layers), [])
        found[statistic] = verdict.to_dict()
        found["seconds"][statistic] = round(time.perf_counter() - started, 3)
        path.write_text(json.dumps(found, indent=1) + "\n")
    return found


def computed(row: dict, statistic: str) -> bool:
    return all(s in row for s in (("margin", "sink") if statistic == "mean" else (statistic,)))


def score(row: dict, statistic: str) -> float:
    """A model's suspicion under ``statistic`` (no evidence: 0)."""
    if statistic == "mean":
        return (score(row, "margin") + score(row, "sink")) / 2
    return row[statistic]["suspicion"] or 0.0


def summarise(rows: list[dict], extra: dict[str, float] | None = None) -> dict:
    """AUC, per attack, false- and true-positive rates at the shipped thresholds, class named = target, for
    every statistic all the rows have; ``extra``: more statistics (verdicts stored in the rows under their
    names) and their thresholds."""
    from fmt_audit.verdict import THRESHOLDS

    thresholds = THRESHOLDS | (extra or {})

    usable = [r for r in rows if r["attack"] == "clean" or r["asr"] >= 0.8]
    clean = [r for r in usable if r["attack"] == "clean"]
    backdoored = [r for r in usable if r["attack"] != "clean"]
    out = {"models": len(rows), "clean": len(clean), "backdoored": len(backdoored),
           "attacks_that_did_not_take": [(r.get("dataset", "digits"), r["attack"], r["number"], r["asr"])
                                         for r in rows if r not in usable]}
    for statistic in (*STATISTICS, *(extra or {})):
        if not all(computed(r, statistic) for r in rows):
            continue

        def values(part, statistic=statistic):
            return [score(r, statistic) for r in part]
        entry = {"auc": round(auc(values(clean), values(backdoored)), 4),
                 "per_attack": {a: round(auc(values(clean), values([r for r in backdoored if r["attack"] == a])), 3)
                                for a in ATTACKS if any(r["attack"] == a for r in backdoored)}}
        cut = thresholds.get(statistic)
        if cut is not None:
            entry |= {"threshold": cut,
                      "false_positive_rate": round(float(np.mean([v >= cut for v in values(clean)])), 4),
                      "true_positive_rate": round(float(np.mean([v >= cut for v in values(backdoored)])), 4),
                      "class_is_target": sum(r[statistic]["target_class"] == r["target"] for r in backdoored)}
        out[statistic] = entry

    def agree(row: dict) -> bool:   # the rule pre-registered for population (B), benchmarks/README.md
        margin = row["margin"]
        return (margin.get("p_value") is not None and margin["p_value"] < 0.05
                and row["sink"]["target_class"] == margin["target_class"])
    if not all(computed(r, "mean") for r in rows):
        return out
    out["agree"] = {"false_positive_rate": round(float(np.mean([agree(r) for r in clean])), 4) if clean else None,
                    "true_positive_rate": round(float(np.mean([agree(r) for r in backdoored])), 4)
                    if backdoored else None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-per-group", type=int, default=6, help="clean models, and models per attack")
    parser.add_argument("--gradient", action="store_true",
                        help="also run and cache a full gradient-mode scan of every model")
    parser.add_argument("--groups", default=",".join(("clean", *ATTACKS)),
                        help="comma-separated groups to build and scan (default: all)")
    parser.add_argument("--first", type=int, default=0, help="build and scan models from this number up")
    parser.add_argument("--dataset", default="digits", choices=DATASETS)
    parser.add_argument("--statistics", default="margin,sink",
                        help="the verdicts to compute, comma-separated: margin, sink, universal, transfer, shortcut, "
                             "untransferred, cleanse, combined "
                             "(cached: a model's verdicts computed before are read back, and every statistic all the "
                             "rows have is summarised)")
    args = parser.parse_args()
    from fmt_audit.fmt.scan import ScanConfig, scan

    task = load_task(args.dataset)
    rows = []
    for attack in args.groups.split(","):
        for number in range(args.first, args.models_per_group):
            started = time.perf_counter()
            facts = build(attack, number, task)
            folder = folder_of(attack, number, task.name)
            found = verdicts(folder, tuple(args.statistics.split(",")))
            if args.gradient:   # every channel through the gradient test, for studying the statistic
                full = scan(folder / "model.onnx", folder / "defender.npz", ScanConfig.from_preset("gradient"))
                (folder / "scan_gradient.json").write_text(full.to_json())
            rows.append({**facts, **{s: found[s] for s in VERDICTS if s in found},
                         "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in STATISTICS}
                             | {s: (round(score(rows[-1], s), 4), rows[-1].get(s, {}).get("target_class"))
                                for s in STATISTICS if computed(rows[-1], s)}), flush=True)
    if not rows:
        return
    summary = summarise(rows)
    print(json.dumps(summary), flush=True)
    shown = [s for s in VERDICTS if all(s in r for r in rows)]
    header = ["index", "attack", "architecture", "target", "poison_rate", "acc", "asr",
              *[c for s in shown for c in (s, f"{s} class")], "seconds"]
    table = [{**{h: r.get(h, "–") for h in header}, **{s: score(r, s) for s in shown},
              **{f"{s} class": r[s]["target_class"] for s in shown}} for r in rows]
    part = ("" if task.name == "digits" else f"{task.name}_") + (f"{args.first}-" if args.first else "")
    groups = "" if args.groups == ",".join(("clean", *ATTACKS)) else "_" + args.groups.replace(",", "-")
    publish([*table, {h: "" for h in header} | {"index": "summary", "attack": json.dumps(summary)}], header,
            f"verdict_population_{part}{args.models_per_group}{groups}_threads{os.cpu_count()}")


if __name__ == "__main__":
    main()
