"""The benchmark models with a known trigger, and the data to measure them: shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "sample_models"


def cases(name: str):
    """(label, model path, defender data, target, clean test set, triggered versions of its images)."""
    from fmt_audit.data import load_npz

    if name == "sample":
        manifest = json.loads((SAMPLES / "manifest.json").read_text())
        targets = {m["attack"]: m["target"] for m in manifest["models"] if m["attack"] != "none"}
        clean = load_npz(SAMPLES / "test.npz")
        for attack in ("badnets", "blended"):
            yield (f"sample {attack}", SAMPLES / f"{attack}_op13.onnx", SAMPLES / "defender.npz", targets[attack],
                   clean, load_npz(SAMPLES / f"{attack}_test.npz").x)
        return
    import cifar_models

    attack = name.removeprefix("cifar10_")
    folder = cifar_models.build(attack).parent
    test = load_npz(folder / "test.npz").take(2000, seed=1)
    triggered = cifar_models.apply_trigger((test.x * 255).round().astype(np.uint8), attack).astype(np.float32) / 255
    yield name, folder / "model.onnx", folder / "defender.npz", cifar_models.TARGET, test, triggered


def arguments(doc: str, presets: str, samples: int) -> argparse.ArgumentParser:
    """The options every benchmark takes: models, presets, N, seed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["sample"])
    parser.add_argument("--presets", default=presets)
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def publish(rows: list[dict], header: list[str], name: str) -> None:
    """Print the rows as a Markdown table and save them as ``benchmarks/results/<name>.json``."""
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")


def model_paths(name: str):
    """(label, model path, defender data) for every model of ``name``: ``sample``, ``cifar10_<attack>``
    or an architecture of ``architectures.py`` (random weights)."""
    import architectures

    if name in architectures.ARCHITECTURES:
        yield from architectures.model_paths(name)
        return
    if name == "sample":
        for attack in ("clean", "badnets", "blended"):
            yield f"sample {attack}", SAMPLES / f"{attack}_op13.onnx", SAMPLES / "defender.npz"
        return
    import cifar_models

    folder = cifar_models.build(name.removeprefix("cifar10_")).parent
    yield name, folder / "model.onnx", folder / "defender.npz"
