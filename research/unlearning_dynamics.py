"""Where the repair's accuracy goes (issue 31: ACC drop ≤ 2 points, clean twins ≤ 1): clean accuracy and attack
success after every epoch of one repair, a diagnostic, not a method.

The repair of ``research/trace_repair.py`` (its cached verdict, trace and reversed triggers beside the cell; same
split, seed, recipe and unlearning radius), its fine-tuning watched epoch by epoch: the test images' accuracy
(the first ``--images`` of the cell's test set) and, on a backdoored cell, the share of as many of its triggered
images not of the target that go to the target. Does the backdoor leave in the first epochs while the accuracy
keeps falling in the last (then the unlearning could stop early and the last epochs fine-tune on clean images
only), or do both move together?

Rows go to ``research/results/unlearning_dynamics.jsonl``.

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/unlearning_dynamics.py \\
        matrix:cifar10-plaincnn-inputaware-p10 --method "trace + stamp unlearning"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
from cases import cases
from selfcheck_probe import predicted

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("trace + unlearning", "trace + stamp unlearning", "fine-tuning only", "unlearning only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", help="matrix:CELL (its verdict and trace cached by research/trace_repair.py)")
    parser.add_argument("--method", choices=METHODS, default="trace + stamp unlearning")
    parser.add_argument("--clean", action="store_true", help="the cell is a clean twin")
    parser.add_argument("--images", type=int, default=1000, help="test images measured after each epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recalibrate", action="store_true",
                        help="after the repair, also measure with BatchNorm's running statistics recomputed from "
                             "the clean training split alone")
    parser.add_argument("--average-from", type=int, default=0, metavar="EPOCH",
                        help="also measure, after each epoch from EPOCH on, the uniform average of the weights (and "
                             "buffers) at the ends of epochs EPOCH..now (a tail average, as SWA's), the training "
                             "itself untouched")
    args = parser.parse_args()

    import torch
    from trace_repair import stamp_unlearning

    import fmt_audit.repair.pipeline as pipeline
    from fmt_audit.data import Preprocessing, load_npz
    from fmt_audit.fmt.scan import ScanConfig
    from fmt_audit.model.loading import load_model
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig
    from fmt_audit.repair.pipeline import repair, unlearning_eps

    (case,) = list(cases(args.cell, clean=args.clean))
    folder = Path(case.model).parent
    loaded = load_model(case.model)
    preprocessing = Preprocessing(case.mean, case.std)
    data = load_npz(case.defender)
    config = RepairConfig(FineTuneConfig(seed=args.seed), unlearn=True)
    train, _ = data.split(config.holdout, seed=args.seed)
    scan_config = ScanConfig(seed=args.seed, mean=case.mean, std=case.std)
    trace_file = folder / f"trace_train_seed{args.seed}.json"
    if args.method.startswith("trace") and not trace_file.exists():
        raise SystemExit(f"{trace_file} is not there: run research/trace_repair.py on the cell first")
    flagged = json.loads(trace_file.read_text())["flagged"] if args.method.startswith("trace") else {}
    pairs = []
    if args.method == "trace + stamp unlearning" and flagged:
        pairs = reversed_triggers(folder, loaded, train, preprocessing, flagged, args.seed)
    eps, _, _ = unlearning_eps(config, None, loaded, train, scan_config)
    settings = (RepairConfig(config.fine_tune, unlearn=False) if args.method == "fine-tuning only"
                else replace(config, unlearn_eps=eps))

    test_x = torch.from_numpy(np.ascontiguousarray(case.test.x[: args.images]))
    test_y = case.test.y[: args.images]
    triggered = None
    if case.triggered is not None:
        victims = case.test.y != case.target
        triggered = torch.from_numpy(np.ascontiguousarray(case.triggered[: min(args.images, int(victims.sum()))]))
    epochs, finals = [], []
    average: dict = {}

    def watched(classifier, *a, progress=None, **k):
        def told(record):
            training = classifier.module.training
            classifier.module.eval()
            row = {"epoch": record.epoch, "lr": round(record.lr, 6), "holdout": record.holdout_accuracy,
                   **measure(classifier, test_x, test_y, triggered, case.target)}
            if args.average_from and record.epoch >= args.average_from:
                row["averaged"] = averaged(classifier, average, record.epoch - args.average_from + 1,
                                           lambda: measure(classifier, test_x, test_y, triggered, case.target))
            classifier.module.train(training)
            epochs.append(row)
            print(json.dumps(row), flush=True)
            if progress:
                progress(record)
        if args.recalibrate:
            finals.append(classifier)
        return fine_tune(classifier, *a, progress=told, **k)

    fine_tune = pipeline.fine_tune
    started = time.perf_counter()
    with mock.patch.object(pipeline, "fine_tune", watched), \
            (stamp_unlearning(pairs) if pairs else contextlib.nullcontext()):
        result = repair(loaded, data, settings, scan_config, flagged=flagged)
    recalibrated = {}
    if finals:
        classifier = finals[-1]
        recalibrated["as trained"] = measure(classifier, test_x, test_y, triggered, case.target)
        recalibrated["batchnorms"] = recalibrate(classifier, train.x)
        recalibrated["recalibrated"] = measure(classifier, test_x, test_y, triggered, case.target)
        print(json.dumps(recalibrated), flush=True)
    row = {"model": case.label, "method": args.method, "removed": sum(map(len, flagged.values())),
           "stamps": len(pairs), "eps": eps,
           **({"average from": args.average_from} if args.average_from else {}),
           "images": args.images, "holdout ACC": result.report.accuracy,
           "epochs": epochs, **({"BatchNorm": recalibrated} if recalibrated else {}),
           "time s": round(time.perf_counter() - started, 1)}
    with (RESULTS / "unlearning_dynamics.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def measure(classifier, test_x, test_y, triggered, target) -> dict:
    """Accuracy on the test images and, where there are triggered ones, the share sent to ``target``."""
    classifier.module.eval()
    row = {"ACC": round(float((predicted(classifier, test_x) == test_y).mean()), 4)}
    if triggered is not None:
        row["ASR"] = round(float((predicted(classifier, triggered) == target).mean()), 4)
    return row


def averaged(classifier, average: dict, count: int, measured) -> dict:
    """``average`` (name -> tensor) moved to the uniform mean of the ``count`` states it has seen, this one
    included; ``measured()`` with the averaged state loaded, then the trained state put back."""
    import torch

    state = {name: value.detach().clone() for name, value in classifier.module.state_dict().items()}
    for name, value in state.items():
        if not torch.is_floating_point(value):
            average[name] = value
        elif count == 1 or name not in average:
            average[name] = value.clone()
        else:
            average[name] += (value - average[name]) / count
    training = classifier.module.training
    classifier.module.load_state_dict(average)
    row = measured()
    classifier.module.load_state_dict(state)
    classifier.module.train(training)
    return row


def recalibrate(classifier, images: np.ndarray, batch: int = 200) -> int:
    """BatchNorm's running statistics recomputed from ``images`` alone (a cumulative average over them, no
    augmentation, weights untouched); how many BatchNorm layers there are."""
    import torch

    norms = [m for m in classifier.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    classifier.module.train()
    with torch.no_grad():
        for start in range(0, len(images), batch):
            classifier(torch.from_numpy(np.ascontiguousarray(images[start:start + batch])))
    classifier.module.eval()
    return len(norms)


def reversed_triggers(folder: Path, loaded, train, preprocessing, flagged: dict, seed: int) -> list:
    """The cached trace's reversed triggers (``research/trace_repair.py`` keeps them beside the cell since the
    stamp study; a cell traced before it is traced again here, and must give the cached trace's channels)."""
    kept = folder / f"trace_stamps_train_seed{seed}.npz"
    if kept.exists():
        with np.load(kept) as saved:
            return list(zip(saved["masks"], saved["patterns"]))
    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.backends.torch.logits import freeze
    from fmt_audit.fmt.trace import TraceConfig, trace_channels

    found = json.loads((folder / f"verdict_combined_train_seed{seed}.json").read_text())
    classifier = BridgedClassifier(to_torch(loaded.proto), preprocessing, "cpu")
    freeze(classifier)
    norms, target = np.asarray(found["norms"], dtype=float), int(found["target_class"])
    result = trace_channels(classifier, loaded.layers, train, target, float(np.median(np.delete(norms, target))),
                            TraceConfig(seed=seed))
    if result.flagged != flagged:
        raise SystemExit("tracing again gave other channels than the cached trace")
    return [(m.numpy(), p.numpy()) for m, p in result.stamps]


if __name__ == "__main__":
    main()
