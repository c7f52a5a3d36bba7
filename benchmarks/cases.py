"""The benchmark models with a known trigger, and the data to measure them: shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent / "sample_models"


# where benchmarks cache what they build; matrix.py exports its cells under matrix/ (read here without torch)
CACHE = Path(os.environ.get("FMT_AUDIT_BENCH_CACHE", Path.home() / ".cache" / "fmt-audit" / "benchmarks"))
MATRIX = CACHE / "matrix"


class Case(NamedTuple):
    """A model with a known trigger and the data to measure it; ``mean``/``std``: the normalisation the model
    expects from its user (None: inside the graph)."""

    label: str
    model: Path
    defender: Path
    target: int | None  # None: a clean twin
    test: object        # fmt_audit.data.Dataset
    triggered: object   # float32 NCHW in [0, 1]: the test images with the trigger (None: a clean twin)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def matrix_label(facts: dict) -> str:
    """``matrix CELL``; ``matrix CELL (cpu)`` for a cell trained on the CPU: the same seeded recipe gives other
    weights there than on the GPU, so rows of the two models must not be taken for one model's."""
    return f"matrix {facts['name']}" + (" (cpu)" if facts.get("trained_on") == "cpu" else "")


def replica_of(part: str) -> tuple[str, int]:
    """``(name, replica)``: ``cifar10-vgg-badnets-p10-r1`` is replica 1 of ``cifar10-vgg-badnets-p10`` (the same
    cell trained again from other seeds, benchmarks/matrix.py); without ``-rN``, replica 0."""
    base, dash, number = part.rpartition("-r")
    return (base, int(number)) if dash and base and number.isdigit() and int(number) > 0 else (part, 0)


def matrix_folders(name: str) -> list[Path]:
    """The exported matrix cells (benchmarks/matrix.py) that ``name`` (``matrix:PART[,PART...]``) names:
    every cell whose name contains one of the parts, of the replica the part names (a part without ``-rN``
    never takes a replica: rows of new models must be asked for)."""
    parts = [replica_of(p) for p in name.removeprefix("matrix:").split(",")]

    def named(folder: Path) -> bool:
        base, replica = replica_of(folder.name)
        return any(part in base and replica == want for part, want in parts)

    found = sorted(f for f in MATRIX.glob("*") if (f / "model.onnx").exists() and named(f))
    if not found:
        raise SystemExit(f"no exported matrix cell matches {name!r} under {MATRIX} "
                         "(python benchmarks/matrix.py export)")
    return found


def normalisation(model: Path) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The mean and std a matrix cell's model expects outside its graph (its facts.json); (None, None) where
    there is no facts.json beside ``model`` or the cell normalises inside the graph."""
    facts_path = Path(model).parent / "facts.json"
    facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}
    return (tuple(facts["mean"]), tuple(facts["std"])) if facts.get("mean") else (None, None)


def cases(name: str, clean: bool = False):
    """Every :class:`Case` of ``name``: ``sample`` or ``matrix:PART[,PART...]`` (backdoored cells only; with
    ``clean``, the clean twins too, with no target and no triggered images: 2,000 of their test images)."""
    from fmt_audit.data import load_npz

    if name.startswith("matrix:"):
        from fmt_audit.data import Dataset

        for folder in matrix_folders(name):
            facts = json.loads((folder / "facts.json").read_text())
            mean, std = normalisation(folder / "model.onnx")
            if facts["attack"] == "clean":
                if clean:       # no trigger to measure: clean accuracy only
                    test = load_npz(folder / "test.npz")
                    chosen = np.sort(np.random.default_rng(1).choice(len(test), size=min(2000, len(test)),
                                                                     replace=False))
                    yield Case(matrix_label(facts), folder / "model.onnx", folder / "defender.npz", None,
                               Dataset(test.x[chosen], test.y[chosen]), None, mean, std)
                continue
            test, target = load_npz(folder / "test.npz"), facts["target"]
            # triggered.npz: the test images not of the target class, in order, with the trigger
            victims = np.flatnonzero(test.y != target)
            rng = np.random.default_rng(1)
            chosen = np.sort(rng.choice(len(victims), size=min(1800, len(victims)), replace=False))
            own = np.flatnonzero(test.y == target)
            own = np.sort(rng.choice(own, size=min(200, len(own)), replace=False))
            triggered = load_npz(folder / "triggered.npz").x[chosen]
            x = np.concatenate([test.x[victims[chosen]], test.x[own]])
            y = np.concatenate([test.y[victims[chosen]], test.y[own]])
            # the target's own images are never triggered (ASR counts the others): their clean copies stand in
            yield Case(matrix_label(facts), folder / "model.onnx", folder / "defender.npz", target,
                       Dataset(x, y), np.concatenate([triggered, test.x[own]]), mean, std)
        return

    if name == "sample":
        manifest = json.loads((SAMPLES / "manifest.json").read_text())
        targets = {m["attack"]: m["target"] for m in manifest["models"] if m["attack"] != "none"}
        clean = load_npz(SAMPLES / "test.npz")
        for attack in ("badnets", "blended"):
            yield Case(f"sample {attack}", SAMPLES / f"{attack}_op13.onnx", SAMPLES / "defender.npz", targets[attack],
                       clean, load_npz(SAMPLES / f"{attack}_test.npz").x)
        return
    raise SystemExit(f"unknown models {name!r}: expected 'sample' or 'matrix:PART[,PART...]'")


def arguments(doc: str, presets: str, samples: int) -> argparse.ArgumentParser:
    """The options every benchmark takes: models, presets, N, seed."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["sample"])
    parser.add_argument("--presets", default=presets)
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def publish(rows: list[dict], header: list[str], name: str) -> None:
    """Print the rows as a Markdown table and save them as ``benchmarks/results/<name>.json`` (a model list's
    ``:`` and ``,`` become ``-`` and ``_`` in the file name)."""
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name.replace(':', '-').replace(',', '_')}.json").write_text(json.dumps(rows, indent=1) + "\n")


def model_paths(name: str):
    """(label, model path, defender data) for every model of ``name``: ``sample``, ``matrix:PART[,PART...]``
    (clean cells too) or an architecture of ``architectures.py`` (random weights)."""
    import architectures

    if name in architectures.ARCHITECTURES:
        yield from architectures.model_paths(name)
        return
    if name == "sample":
        for attack in ("clean", "badnets", "blended"):
            yield f"sample {attack}", SAMPLES / f"{attack}_op13.onnx", SAMPLES / "defender.npz"
        return
    for folder in matrix_folders(name):
        yield f"matrix {folder.name}", folder / "model.onnx", folder / "defender.npz"
