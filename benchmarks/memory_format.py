"""Channels-last on the CPU (issue 32): the torch stages in the default memory order against channels-last.

The torch module a graph is converted to runs its convolutions forward and backward in the order its
activations and weights are kept in; `fmt_audit.backends.torch.bridge.CHANNELS_LAST_ON_CPU` chooses
channels-last on a CPU (where a probe gives the same logits). Each model and order in a fresh process, the
two orders alternating, `--repeats` times; medians and their ratio. Stages, on the first `--samples` images of
a seeded shuffle of the defender data:

* the verdict's trigger search (`reverse_triggers`), `--trigger-steps` of its 300 Adam steps (every step is
  the same work: forward and backward through the network for every class's images), and the per-class
  mask norms it ends with, compared between the orders;
* one epoch of the repair's fine-tuning on all the defender images (batch as `repair` chooses);
* with `--verdict`, the whole default verdict, and whether both orders give the same one.

    python benchmarks/memory_format.py sample matrix:cifar10-preact18q-badnets-p10 --repeats 3
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cases import arguments, model_paths, normalisation, publish

ORDERS = ("default", "channels-last")


def measure(model: str, data: str, order: str, samples: int, trigger_steps: int, verdict: bool) -> dict:
    """One model in one memory order, in this process."""
    import numpy as np

    import fmt_audit.backends.torch.bridge as bridge_module
    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.data import Preprocessing, load_data
    from fmt_audit.model.loading import load_model
    from fmt_audit.repair.config import FineTuneConfig
    from fmt_audit.repair.finetune import fine_tune
    from fmt_audit.verdict import VerdictConfig, assess
    from fmt_audit.verdict.config import CleanseConfig
    from fmt_audit.verdict.evidence.cleanse import reverse_triggers

    bridge_module.CHANNELS_LAST_ON_CPU = order == "channels-last"
    loaded = load_model(model)
    mean, std = normalisation(Path(model))
    preprocessing = Preprocessing(mean, std)
    dataset = load_data(data, loaded.image_input, loaded.num_classes)
    classifier = BridgedClassifier(to_torch(loaded.classifier), preprocessing, "cpu")
    row = {"memory format": str(classifier.memory_format).removeprefix("torch.")}
    started = time.perf_counter()
    found = reverse_triggers(classifier, dataset.take(samples, seed=0), loaded.num_classes,
                             CleanseConfig(steps=trigger_steps))
    row["trigger search s"] = time.perf_counter() - started
    row["norms"] = [float(v) for v in np.asarray(found.norms)]
    started = time.perf_counter()
    fine_tune(classifier, dataset, FineTuneConfig(epochs=1), flip=False)
    row["fine-tuning epoch s"] = time.perf_counter() - started
    row["images"] = len(dataset)
    if verdict:
        started = time.perf_counter()
        decided = assess(loaded, data, VerdictConfig(samples=samples), mean, std, "cpu")
        row["verdict s"] = time.perf_counter() - started
        row["verdict"] = decided.to_dict()
    return row


def main() -> None:
    parser = arguments(__doc__, "", 256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trigger-steps", type=int, default=30)
    parser.add_argument("--verdict", action="store_true", help="also the whole default verdict, both ways")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "DATA", "ORDER"), help="one run in this process")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.samples, args.trigger_steps, args.verdict)))
        return
    rows = []
    for name in args.models:
        for label, model, data in model_paths(name):
            runs: dict[str, list[dict]] = {order: [] for order in ORDERS}
            for repeat in range(args.repeats):
                for order in ORDERS if repeat % 2 == 0 else ORDERS[::-1]:
                    out = subprocess.run([sys.executable, __file__, "--one", str(model), str(data), order,
                                          "--samples", str(args.samples), "--trigger-steps", str(args.trigger_steps),
                                          *(["--verdict"] if args.verdict and repeat == 0 else [])],
                                         capture_output=True, text=True, check=True).stdout
                    runs[order].append(json.loads(out.strip().splitlines()[-1]))
            default, reordered = runs["default"], runs["channels-last"]
            row = {"model": label, "format used": reordered[0]["memory format"], "images": default[0]["images"]}
            for stage in ("trigger search s", "fine-tuning epoch s"):
                before = statistics.median(r[stage] for r in default)
                after = statistics.median(r[stage] for r in reordered)
                row[f"{stage} default"], row[f"{stage} channels-last"] = round(before, 2), round(after, 2)
                row[f"{stage} speed-up"] = round(before / after, 2)
            row["max norm difference"] = max(abs(a - b) for a, b in zip(default[0]["norms"], reordered[0]["norms"]))
            if args.verdict:
                row["verdict s default"] = round(default[0]["verdict s"], 1)
                row["verdict s channels-last"] = round(reordered[0]["verdict s"], 1)
                row["same verdict"] = default[0]["verdict"] == reordered[0]["verdict"]
                row["suspicion"] = [default[0]["verdict"]["suspicion"], reordered[0]["verdict"]["suspicion"]]
            rows.append(row)
            print(row, flush=True)
    header = ["model", "format used", "trigger search s default", "trigger search s channels-last",
              "trigger search s speed-up", "fine-tuning epoch s default", "fine-tuning epoch s channels-last",
              "fine-tuning epoch s speed-up", "max norm difference",
              *(["verdict s default", "verdict s channels-last", "same verdict"] if args.verdict else [])]
    threads = os.environ.get("OMP_NUM_THREADS", os.cpu_count())
    publish(rows, header, f"memory_format_{'-'.join(args.models)}_n{args.samples}_threads{threads}")


if __name__ == "__main__":
    main()
