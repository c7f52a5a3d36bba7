"""Fleet audits (issue 10): the same fleet in-process, on Ray with 1 worker and with 2, side by side in one run.

The fleet: the bundled sample models (three attacks, two exporters), the CIFAR-10
benchmark models (BadNets, blended) and one digit model per attack of the verdict
population, each with its own defender data through a manifest (copied into a
work folder: manifests may not point outside their folder). Every run rescans
everything (``force``); reports must agree between runs (verdict, suspicion,
flagged channels). Wall times and the ratio to the in-process run are reported.

With ``--repair-epochs E`` every model is also repaired (``fleet --repair --epochs E``); the removed
channels must agree too.

    python benchmarks/fleet_speed.py [--samples 64] [--repeats 1] [--groups sample,digits,cifar] [--repair-epochs E]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cases import SAMPLES, model_paths, publish

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "research"))   # the verdict study's digit models
from verdict_population import ATTACKS, folder_of

GROUPS = ("sample", "digits", "cifar")


def fleet_members(groups: tuple[str, ...] = GROUPS) -> list[tuple[str, Path, Path]]:
    """(name, model, data) of every member of ``groups``."""
    members = []
    if "sample" in groups:
        members += [(f"sample_{p.stem}", p, SAMPLES / "defender.npz") for p in sorted(SAMPLES.glob("*.onnx"))]
    if "cifar" in groups:
        # two matrix cells with the normalisation inside the graph (a fleet passes no --mean/--std)
        members += [(label.removeprefix("matrix "), model, data) for label, model, data
                    in model_paths("matrix:cifar10-preact18q-blended-p10,cifar10-preact18q-clean")]
    if "digits" in groups:
        for attack in ("clean", *ATTACKS):
            folder = folder_of(attack, 0)
            if (folder / "model.onnx").exists():
                members.append((f"digits_{attack}", folder / "model.onnx", folder / "defender.npz"))
    return members


def stage(work: Path, groups: tuple[str, ...]) -> Path:
    """Copy the members into ``work`` and write the manifest; its path."""
    entries = []
    for name, model, data in fleet_members(groups):
        shutil.copy(model, work / f"{name}.onnx")
        external = model.with_name(model.name + ".data")
        if external.exists():   # the graph names its data file by the original model's name
            shutil.copy(external, work / external.name)
        shutil.copy(data, work / f"{name}.npz")
        entries.append({"model": f"{name}.onnx", "data": f"{name}.npz"})
    manifest = work / "fleet.json"
    manifest.write_text(json.dumps({"models": entries}, indent=1))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--groups", default=",".join(GROUPS), help="members: sample, digits, cifar")
    parser.add_argument("--repair-epochs", type=int, default=None, help="also repair, fine-tuning this many epochs")
    args = parser.parse_args()
    repair = None if args.repair_epochs is None else {"epochs": args.repair_epochs}
    from fmt_audit.fleet.audit import read_source, run_fleet

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        models = read_source(stage(work, tuple(args.groups.split(","))))
        runs = {"in-process": {"use_ray": False}, "ray, 1 worker": {"use_ray": True, "workers": 1},
                "ray, 2 workers": {"use_ray": True, "workers": 2}}
        times: dict[str, list[float]] = {name: [] for name in runs}
        outcomes = {}
        for _ in range(args.repeats):
            for name, settings in runs.items():
                started = time.perf_counter()
                result = run_fleet(models, None, work / name.replace(" ", "_").replace(",", ""),
                                   {"samples": args.samples}, repair=repair, force=True, **settings)
                times[name].append(time.perf_counter() - started)
                outcomes[name] = [(r.model, r.verdict, r.suspicion, r.flagged, r.removed, r.error) for r in result.rows]
                print(name, round(times[name][-1], 1), result.engine, flush=True)
    agree = all(rows == outcomes["in-process"] for rows in outcomes.values())
    base = statistics.median(times["in-process"])
    rows = [{"run": name, "models": len(models), "median s": round(statistics.median(t), 1),
             "vs in-process": round(statistics.median(t) / base, 2), "reports agree": agree}
            for name, t in times.items()]
    publish(rows, ["run", "models", "median s", "vs in-process", "reports agree"],
            f"fleet_speed_{args.groups.replace(',', '-')}"
            + (f"_repair{args.repair_epochs}" if repair else "") + f"_threads{os.cpu_count()}")


if __name__ == "__main__":
    main()
