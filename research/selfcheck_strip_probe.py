"""Does a surviving backdoor come back into view once the repaired model's clean task is stripped? A development
probe for the self-check (docs/research/repair-self-check.md), not a method.

The self-check runs the verdict on the repaired model; unlearning makes every class hard to reach with a small
stamp, so a backdoor that survived (a CIFAR-10 plain CNN's BadNets kept 73% ASR) hides from the trigger search
and the self-check says `removed`. RNP (Li et al., ICML 2023) and BaDExpert (Xie et al., ICLR 2024) report
that a backdoored model made to forget its clean task, by gradient ascent on clean images, keeps its backdoor.
Here, for the model as given and a repaired model (the same graph, ``research/trace_repair.py --keep-models``):
gradient ascent on the cross-entropy of the repair's training split (SGD, ``--lr`` 0.01, momentum 0.9, batch
128, the module in training mode) until its accuracy on the verdict's sample is at most 20% (checked every step,
at most 20 epochs); then
on the cell's clean test images not of the target, the share each class takes (does the stripped model collapse
into the target?), and on the triggered test images the real trigger's ASR (does the backdoor survive the
stripping?). Rows go to ``research/results/selfcheck_strip_probe.jsonl``.

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/selfcheck_strip_probe.py \\
        matrix:cifar10-plaincnn-badnets-p10-r3 --repaired repaired_strip-main_trace-unlearning-self-checked.onnx
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def stripped(loaded, preprocessing, train, sample, floor: float, epochs: int, seed: int, lr: float):
    """A copy of ``loaded``'s classifier trained to forget ``train`` (gradient ascent on its cross-entropy) until
    its accuracy on ``sample`` is at most ``floor`` (checked after every step); with the steps it took and the
    accuracy it ended at."""
    import torch
    from selfcheck_probe import predicted

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.backends.torch.logits import as_logits

    torch.manual_seed(seed)
    classifier = BridgedClassifier(to_torch(loaded.classifier), preprocessing, "cpu")
    optimizer = torch.optim.SGD(classifier.module.parameters(), lr=lr, momentum=0.9)
    x, y = torch.from_numpy(np.ascontiguousarray(train.x)), torch.from_numpy(train.y.astype(np.int64))
    x_sample, y_sample = torch.from_numpy(np.ascontiguousarray(sample.x)), sample.y

    def accuracy() -> float:
        classifier.module.eval()
        return float((predicted(classifier, x_sample) == y_sample).mean())

    rng = np.random.default_rng(seed)
    steps, now = 0, accuracy()
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(len(x)), max(1, len(x) // 128)):
            if now <= floor:
                break
            classifier.module.train()
            loss = -torch.nn.functional.cross_entropy(as_logits(classifier(x[batch])), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps, now = steps + 1, accuracy()     # checked every step: stop at the floor, not past it
    classifier.module.eval()
    return classifier, steps, now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", help="matrix:CELL")
    parser.add_argument("--repaired", required=True, help="the repaired model: a file name in the cell's folder")
    parser.add_argument("--floor", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--search", action="store_true", help="run the verdict's trigger search on each stripped model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from selfcheck_probe import given_and_repaired, predicted

    from fmt_audit.backends.torch.logits import freeze
    from fmt_audit.data import load_npz
    from fmt_audit.repair.config import RepairConfig
    from fmt_audit.verdict.config import CleanseConfig
    from fmt_audit.verdict.evidence.cleanse import reverse_triggers

    pair = given_and_repaired(args.cell, args.repaired, args.seed)
    case = pair.case
    train, _ = load_npz(case.defender).split(RepairConfig().holdout, seed=args.seed)
    row = {"model": case.label, "repaired": Path(args.repaired).name, "target": case.target, "floor": args.floor,
           "lr": args.lr, "models": {}}
    for name, loaded in (("given", pair.given), ("repaired", pair.repaired)):
        started = time.perf_counter()
        classifier, steps, accuracy = stripped(loaded, pair.preprocessing, train, pair.sample, args.floor,
                                                args.epochs, args.seed, args.lr)
        shares = np.bincount(predicted(classifier, pair.clean), minlength=loaded.num_classes) / len(pair.clean)
        figures = {"steps": steps, "sample accuracy": round(accuracy, 4),
                   "clean shares": [round(float(v), 4) for v in shares], "top class": int(shares.argmax()),
                   "target share": round(float(shares[case.target]), 4) if case.target is not None else None,
                   "s": round(time.perf_counter() - started, 1)}
        if pair.triggered is not None:
            figures["ASR stripped"] = round(float((predicted(classifier, pair.triggered) == case.target).mean()), 4)
        if args.search:
            # the verdict's trigger search on the stripped model: is the target's reversed trigger small again?
            # (the class it collapses into is reached by almost any mask: left out of the others' median)
            freeze(classifier)
            found = reverse_triggers(classifier, pair.sample, loaded.num_classes, CleanseConfig(seed=args.seed))
            norms = np.asarray(found.norms, dtype=float)
            others = np.delete(norms, sorted({case.target, figures["top class"]}))
            figures["search"] = {"norms": [round(float(v), 5) for v in norms], "target norm": round(float(
                norms[case.target]), 5), "others' median": round(float(np.median(others)), 5),
                "ratio": round(float(np.median(others)) / max(float(norms[case.target]), 1e-9), 3),
                "target rank": int((norms < norms[case.target]).sum()) + 1}
        row["models"][name] = figures
        print(json.dumps({name: figures}), flush=True)
    with (RESULTS / "selfcheck_strip_probe.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
