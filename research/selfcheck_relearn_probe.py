"""Does a repaired model relearn the target's reversed trigger faster than the same pixels sent to another class?
A development probe for the self-check (docs/research/repair-self-check.md), not a method.

Issue 31's re-activation test (one epoch on the defender data with 1% poisoned) separates a failed repair from
one that worked (CIFAR-10 plain CNN BadNets r3: 88.9% ASR back against 8.2%), but it needs the real trigger.
Here the trigger is the model as given's reversed trigger for the target (Neural Cleanse's search, the
verdict's settings, a seed the repair did not use), and the control is the same stamp labelled with another
class: a backdoor still in the repaired model should make the stamp → target association come back faster
than stamp → other. For the model as given (reference) and a repaired one: one epoch of SGD (lr 0.01,
momentum 0.9, batch 128, training mode) on the repair's training split with 1% of it stamped and labelled
with the class; then the stamp's success on the cell's clean test images of neither class. Rows go to
``research/results/selfcheck_relearn_probe.jsonl``.

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/selfcheck_relearn_probe.py \\
        matrix:cifar10-plaincnn-badnets-p10-r3 --repaired repaired_strip-main_trace-unlearning-self-checked.onnx
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def relearned(loaded, preprocessing, train, stamp, label: int, test, share: float, seed: int) -> tuple[float, float]:
    """``stamp``'s success (into ``label``) on ``test`` before and after one epoch on ``train`` with ``share`` of
    it stamped and labelled ``label``, on a fresh copy of ``loaded``'s classifier."""
    import torch
    from selfcheck_probe import predicted

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.backends.torch.logits import as_logits
    from fmt_audit.verdict.evidence.cleanse import stamped

    torch.manual_seed(seed)
    classifier = BridgedClassifier(to_torch(loaded.classifier), preprocessing, "cpu")
    classifier.module.eval()
    x_test = stamped(test, *stamp)
    before = float((predicted(classifier, x_test) == label).mean())
    rng = np.random.default_rng(seed)
    x, y = torch.from_numpy(np.ascontiguousarray(train.x)).clone(), torch.from_numpy(train.y.astype(np.int64))
    poisoned = rng.choice(len(x), max(1, round(share * len(x))), replace=False)
    x[poisoned] = stamped(x[poisoned], *stamp)
    y[poisoned] = label
    optimizer = torch.optim.SGD(classifier.module.parameters(), lr=0.01, momentum=0.9)
    classifier.module.train()
    for batch in np.array_split(rng.permutation(len(x)), max(1, len(x) // 128)):
        loss = torch.nn.functional.cross_entropy(as_logits(classifier(x[batch])), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    classifier.module.eval()
    return before, float((predicted(classifier, x_test) == label).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", help="matrix:CELL")
    parser.add_argument("--repaired", required=True, help="the repaired model: a file name in the cell's folder")
    parser.add_argument("--share", type=float, default=0.01)
    parser.add_argument("--search-seed", type=int, default=7, help="the reversed trigger's search seed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from selfcheck_probe import given_and_repaired

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.backends.torch.logits import freeze
    from fmt_audit.data import load_npz
    from fmt_audit.repair.config import RepairConfig
    from fmt_audit.verdict.config import CleanseConfig
    from fmt_audit.verdict.evidence.cleanse import search_class

    pair = given_and_repaired(args.cell, args.repaired, args.seed)
    case, target = pair.case, pair.case.target
    train, _ = load_npz(case.defender).split(RepairConfig().holdout, seed=args.seed)
    given = BridgedClassifier(to_torch(pair.given.classifier), pair.preprocessing, "cpu")
    freeze(given)
    fit = np.flatnonzero(pair.sample.y != target)[:64]
    mask, pattern = search_class(given, torch.from_numpy(np.ascontiguousarray(pair.sample.x)), fit, target,
                                 CleanseConfig(seed=args.search_seed), seed=args.search_seed)
    if mask is None:
        raise SystemExit("the search reached no level on the model as given")
    stamp = (mask.detach(), pattern.detach())
    other = (target + 1) % pair.given.num_classes
    keep = (case.test.y != target) & (case.test.y != other)
    test = torch.from_numpy(np.ascontiguousarray(case.test.x[keep]))
    row = {"model": case.label, "repaired": Path(args.repaired).name, "target": target, "other": other,
           "stamp share": round(float(mask.mean()), 5), "share": args.share, "models": {}}
    for name, loaded in (("given", pair.given), ("repaired", pair.repaired)):
        figures = {}
        for label, word in ((target, "to target"), (other, "to other")):
            before, after = relearned(loaded, pair.preprocessing, train, stamp, label, test, args.share, args.seed)
            figures[word] = {"before": round(before, 4), "after": round(after, 4)}
        row["models"][name] = figures
        print(json.dumps({name: figures}), flush=True)
    with (RESULTS / "selfcheck_relearn_probe.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
