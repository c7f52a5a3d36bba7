"""Why the self-check can say ``removed`` where the backdoor stayed (docs/research/repair-self-check.md): one
cell's model as given and a repaired model side by side, on the verdict's own sample (256 images of the
1,800-image training split, seed 0):

* the real trigger's ASR on each (the cell's triggered test images);
* every class's smallest reversed trigger (Neural Cleanse's search, the verdict's settings) at the search's
  level of success (99%) and at lower ones: the target's mask share, the other classes' median, their ratio
  and the target's rank (1: the smallest). A backdoor that works on half the images may hide from a search
  that asks for 99%;
* how the given model's reversed trigger for the target transfers: its success on the repaired model.

The repaired model is a file (``research/trace_repair.py --keep-models`` writes one beside the cell). Rows go
to ``research/results/selfcheck_probe.jsonl``.

    cd benchmarks && PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/trace_repair.py \\
        matrix:cifar10-plaincnn-badnets-p10 --tag probe --methods "trace + unlearning" --keep-models
    PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/selfcheck_probe.py matrix:cifar10-plaincnn-badnets-p10 \\
        --repaired repaired_probe_trace-unlearning.onnx
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from cases import cases

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Pair:
    """A cell's model as given and a repaired model beside it, with what the probes measure them on."""

    case: object
    given: object                   # LoadedModel
    repaired: object                # LoadedModel: the given graph with the repaired weights
    preprocessing: object
    sample: object                  # the verdict's sample of the repair's training split
    clean: object                   # torch: the clean test images not of the target (all of them on a twin)
    triggered: object | None        # torch: as many triggered test images (None on a clean twin)


def given_and_repaired(cell: str, repaired_name: str, seed: int) -> Pair:
    """``cell`` (``matrix:CELL``) and the repaired model ``repaired_name`` kept in its folder
    (``research/trace_repair.py --keep-models``), with the verdict's sample: the repair's split and seed."""
    import onnx
    import torch

    from fmt_audit.data import Preprocessing, load_npz
    from fmt_audit.model.loading import load_model
    from fmt_audit.repair.config import RepairConfig
    from fmt_audit.verdict import VerdictConfig

    (case,) = list(cases(cell))
    folder = Path(case.model).parent
    given = load_model(case.model)
    repaired = replace(given, proto=onnx.load(str(folder / Path(repaired_name).name)))
    train, _ = load_npz(case.defender).split(RepairConfig().holdout, seed=seed)
    victims = case.test.y != case.target if case.target is not None else np.ones(len(case.test.y), bool)
    triggered = (torch.from_numpy(np.ascontiguousarray(case.triggered[: int(victims.sum())]))
                 if case.triggered is not None else None)
    return Pair(case, given, repaired, Preprocessing(case.mean, case.std),
                train.take(VerdictConfig().samples, seed=seed),
                torch.from_numpy(np.ascontiguousarray(case.test.x[victims])), triggered)


def predicted(classifier, images) -> np.ndarray:
    """``classifier``'s classes for ``images`` (torch), in batches of 256."""
    import torch

    with torch.inference_mode():
        return np.concatenate([classifier(images[s:s + 256]).argmax(1).numpy() for s in range(0, len(images), 256)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", help="matrix:CELL (one backdoored cell)")
    parser.add_argument("--repaired", required=True, help="the repaired model: a file name in the cell's folder")
    parser.add_argument("--levels", default="0.99,0.75,0.5", help="the searches' levels of success")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.verdict.config import CleanseConfig
    from fmt_audit.verdict.evidence.cleanse import reverse_triggers, stamped

    pair = given_and_repaired(args.cell, args.repaired, args.seed)
    case, given, repaired, preprocessing = pair.case, pair.given, pair.repaired, pair.preprocessing
    sample, clean, triggered = pair.sample, pair.clean, pair.triggered
    classes = given.num_classes

    row = {"model": case.label, "repaired": Path(args.repaired).name, "target": case.target, "models": {}}
    given_trigger = None
    for name, loaded in (("given", given), ("repaired", repaired)):
        classifier = BridgedClassifier(to_torch(loaded.classifier), preprocessing, "cpu")
        figures = {"ASR": round(float((predicted(classifier, triggered) == case.target).mean()), 4), "levels": {}}
        for level in map(float, args.levels.split(",")):
            started = time.perf_counter()
            found = reverse_triggers(classifier, sample, classes, CleanseConfig(level=level, seed=args.seed))
            norms = np.asarray(found.norms)
            others = float(np.median(np.delete(norms, case.target)))
            figures["levels"][str(level)] = {
                "norms": found.norms, "reached": found.reached, "target norm": found.norms[case.target],
                "others' median": round(others, 6), "ratio": round(others / max(norms[case.target], 1e-9), 3),
                "target rank": int((norms < norms[case.target]).sum()) + 1, "s": round(time.perf_counter() - started)}
            if name == "given" and level == 0.99:
                given_trigger = tuple(torch.from_numpy(part[case.target]) for part in (found.masks, found.patterns))
        if given_trigger is not None:
            hits = predicted(classifier, stamped(clean, *given_trigger)) == case.target
            figures["given model's reversed trigger, success"] = round(float(hits.mean()), 4)
        row["models"][name] = figures
        print(json.dumps({name: figures}), flush=True)
    with (RESULTS / "selfcheck_probe.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
