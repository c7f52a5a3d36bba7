"""Does a surviving backdoor show as the class clean images fall into when the neurons are perturbed? A
development probe for the self-check (docs/research/repair-self-check.md), not a method.

ANP (Wu & Wang, NeurIPS 2021) observes that under a small adversarial perturbation of its neurons a backdoored
model misclassifies clean images far more readily than a clean one, and into the target class. Here, for the
model as given and a repaired model (the same graph, ``research/trace_repair.py --keep-models``): every Conv
output channel (where the repair removes channels) is scaled by ``1 + d`` with ``|d| <= eps``; ``d`` starts
uniform in ``[-eps, eps]`` and takes ``--steps`` signed-gradient steps of ``eps / 10`` up the cross-entropy of
the verdict's sample (its true labels); then, with that perturbation, on the cell's clean test images not of
the target: the share each class takes. Rows go to ``research/results/selfcheck_anp_probe.jsonl``.

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/selfcheck_anp_probe.py \\
        matrix:cifar10-plaincnn-badnets-p10-r3 --repaired repaired_strip-main_trace-unlearning-self-checked.onnx
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def perturbed_shares(loaded, preprocessing, sample, clean, eps: float, steps: int, seed: int) -> dict:
    """The share of ``clean`` each class takes under the neuron perturbation of size ``eps`` fitted to raise the
    cross-entropy of ``sample``, and the sample's accuracy under it."""
    import torch
    from selfcheck_probe import predicted

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.backends.torch.logits import as_logits, freeze

    classifier = BridgedClassifier(to_torch(loaded.classifier), preprocessing, "cpu")
    freeze(classifier)
    modules = classifier.bridge.channel_modules
    generator = torch.Generator().manual_seed(seed)
    widths = {layer.name: layer.out_channels for layer in loaded.layers}     # the channels the masks sit on
    d = {n: ((torch.rand(w, generator=generator) * 2 - 1) * eps).requires_grad_(True) for n, w in widths.items()}
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: out * (1 + d[n]).view(1, -1, 1, 1))
               for n, m in modules.items() if n in d]
    try:
        x = torch.from_numpy(np.ascontiguousarray(sample.x))
        y = torch.from_numpy(sample.y.astype(np.int64))
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(as_logits(classifier(x)), y)
            grads = torch.autograd.grad(loss, list(d.values()))
            with torch.no_grad():
                for value, grad in zip(d.values(), grads):
                    value.add_(eps / 10 * grad.sign()).clamp_(-eps, eps)
        accuracy = float((predicted(classifier, x) == sample.y).mean())
        shares = np.bincount(predicted(classifier, clean), minlength=loaded.num_classes) / len(clean)
    finally:
        for handle in handles:
            handle.remove()
    return {"sample accuracy": round(accuracy, 4), "clean shares": [round(float(v), 4) for v in shares]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell", help="matrix:CELL")
    parser.add_argument("--repaired", required=True, help="the repaired model: a file name in the cell's folder")
    parser.add_argument("--eps", default="0.05,0.1,0.2,0.3,0.4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from selfcheck_probe import given_and_repaired

    pair = given_and_repaired(args.cell, args.repaired, args.seed)
    case = pair.case
    row = {"model": case.label, "repaired": Path(args.repaired).name, "target": case.target, "steps": args.steps,
           "models": {}}
    for name, loaded in (("given", pair.given), ("repaired", pair.repaired)):
        started = time.perf_counter()
        figures = {}
        for eps in map(float, args.eps.split(",")):
            found = perturbed_shares(loaded, pair.preprocessing, pair.sample, pair.clean, eps, args.steps, args.seed)
            shares = np.asarray(found["clean shares"])
            figures[str(eps)] = {**found, "top class": int(shares.argmax()),
                                 "target share": float(shares[case.target]) if case.target is not None else None}
        figures["s"] = round(time.perf_counter() - started, 1)
        row["models"][name] = figures
        print(json.dumps({name: {k: (v if k == "s" else {kk: v[kk] for kk in ("sample accuracy", "top class",
                                                                                "target share")})
                                 for k, v in figures.items()}}), flush=True)
    with (RESULTS / "selfcheck_anp_probe.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
