"""A self-check that asks the model as given where to look (docs/research/repair-self-check.md, "Joint search"):
every class's smallest trigger that sends images into the class in *both* the model as given and the repaired
one, Neural Cleanse's search (the verdict's settings) run on a classifier that says ``k`` only where both do.

After unlearning, a trigger search on the repaired model alone no longer finds the real trigger
(research/selfcheck_probe.py: the target ranks 8 of 10 while the real patch still works on half the images):
the unlearning is adversarial training and every class's reversed trigger grows. A trigger that must also
work on the model as given is held near the backdoor the model as given learned; where the repair removed
it, the target's joint trigger is as large as any class's; where the backdoor persists, the real trigger (or
one near it) satisfies both and the target's joint mask stays small.

The joint classifier's scores: per class ``j`` the smaller of its two margins (logit minus the largest other
logit, in each model), and one more column fixed at 0, so the argmax is ``k`` exactly where both models put
the image in ``k``, and cross-entropy towards ``k`` raises the worse of the two margins.

Rows (one per cell and repaired model) go to ``research/results/selfcheck_joint_probe.jsonl``.

    cd benchmarks && PYTHONPATH=..:. OMP_NUM_THREADS=1 python ../research/selfcheck_joint_probe.py \\
        matrix:cifar10-plaincnn-badnets-p10 --repaired repaired_probe_trace-unlearning.onnx
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from selfcheck_probe import given_and_repaired, predicted

RESULTS = Path(__file__).resolve().parent / "results"


class BothSay:
    """A classifier over two bridged classifiers whose argmax is ``k`` only where both predict ``k``."""

    def __init__(self, first, second):
        import torch

        self.first, self.second = first, second
        self.module = torch.nn.ModuleList([first.module, second.module])   # freeze() sets both to eval
        self.device = first.device

    def __call__(self, x):
        import torch

        from fmt_audit.backends.torch.logits import as_logits

        def margin(logits):
            top2 = logits.topk(2, dim=1).values
            # each class's logit minus the largest of the others'
            other = torch.where(logits == top2[:, :1], top2[:, 1:2], top2[:, :1])
            return logits - other

        both = torch.minimum(margin(as_logits(self.first(x))), margin(as_logits(self.second(x))))
        return torch.cat([both, torch.zeros((len(x), 1), device=x.device, dtype=both.dtype)], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", help="matrix:CELL")
    parser.add_argument("--repaired", required=True, help="the repaired model: a file name in the cell's folder")
    parser.add_argument("--levels", default="0.99,0.5", help="the searches' levels of success")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="what the repaired model is (kept in the row)")
    args = parser.parse_args()

    import torch

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.verdict.config import CleanseConfig
    from fmt_audit.verdict.evidence.cleanse import reverse_triggers, stamped

    pair = given_and_repaired(args.cell, args.repaired, args.seed)
    case, given, repaired, preprocessing = pair.case, pair.given, pair.repaired, pair.preprocessing
    sample, clean, triggered = pair.sample, pair.clean, pair.triggered
    classes = given.num_classes
    target = case.target

    given_classifier = BridgedClassifier(to_torch(given.classifier), preprocessing, "cpu")
    repaired_classifier = BridgedClassifier(to_torch(repaired.classifier), preprocessing, "cpu")
    joint = BothSay(given_classifier, repaired_classifier)
    row = {"model": case.label, "repaired": Path(args.repaired).name, "note": args.note, "target": target,
           "ASR": None if triggered is None else
           {name: round(float((predicted(c, triggered) == target).mean()), 4)
            for name, c in (("given", given_classifier), ("repaired", repaired_classifier))},
           "levels": {}}
    print(json.dumps(row), flush=True)
    for level in map(float, args.levels.split(",")):
        started = time.perf_counter()
        found = reverse_triggers(joint, sample, classes, CleanseConfig(level=level, seed=args.seed))
        norms = np.asarray(found.norms)
        named = int(np.argmin(norms))
        others = float(np.median(np.delete(norms, named)))
        figures = {"norms": found.norms, "reached": found.reached, "success (both)": found.success,
                   "smallest": named, "ratio": round(others / max(norms[named], 1e-9), 3),
                   "s": round(time.perf_counter() - started)}
        if target is not None:
            theirs = float(np.median(np.delete(norms, target)))
            figures.update({"target norm": found.norms[target], "target ratio":
                            round(theirs / max(norms[target], 1e-9), 3),
                            "target rank": int((norms < norms[target]).sum()) + 1})
            # how the target's joint trigger does on the repaired model alone
            mask, pattern = (torch.from_numpy(part[target]) for part in (found.masks, found.patterns))
            figures["target trigger on repaired"] = round(float(
                (predicted(repaired_classifier, stamped(clean, mask, pattern)) == target).mean()), 4)
        row["levels"][str(level)] = figures
        print(json.dumps({str(level): figures}), flush=True)
    with (RESULTS / "selfcheck_joint_probe.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
