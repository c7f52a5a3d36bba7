"""The referenced margin: the maximum-margin test with the natural attractor classes discounted by a
reference network trained on the defender's own clean images (a study, benchmarks/README.md, Verdict).

Some classes are easy to reach in every model trained on a dataset, backdoored or not: natural attractor
classes (in the project's populations MNIST 8, CIFAR-10 6, GTSRB 12, across seeds and architectures;
benchmarks/README.md, Verdict). A class-level test that asks "which class is abnormally easy to reach?"
names them in clean models. They come from the data, not from the architecture, so a small network trained
on the defender's clean images finds the same ones; a backdoor's target is easy only in the audited model.
:func:`referenced_margin` compares the two: each class's maximum margin in the audited model divided by how
much easier than the median class that class is in the reference (classes at or below the median are not
changed), then MM-BD's p-value as :func:`fmt_audit.verdict.margin_verdict` takes it.

The reference is :func:`fmt_audit.verdict.evidence.reference.train_reference`'s plain CNN (the transfer verdict's
references), trained from a seed with random crops, in [0, 1] pixel space. Its margins are cached per
dataset and seed beside the population's models; the audited models' margins are read from their cached
verdicts (``verdict_population.py``).

    python benchmarks/verdict_reference.py --dataset digits --groups badnets,blended,sig,warp --first 18 \
        --models-per-group 22
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np

from fmt_audit.verdict import Verdict

SEEDS = (0, 1, 2)


def reference_margins(dataset: str, seed: int) -> np.ndarray:
    """The reference's maximum margin per class, trained on the scan's images of the dataset's defender split
    (cached)."""
    from verdict_population import CACHE, load_task

    from fmt_audit.data import load_npz
    from fmt_audit.fmt.scan import ScanConfig
    from fmt_audit.verdict import MarginConfig
    from fmt_audit.verdict.evidence.reference import train_reference
    from fmt_audit.verdict.margin import max_margins

    path = (CACHE if dataset == "digits" else CACHE / dataset) / f"reference_{seed}.json"
    if path.exists():
        return np.array(json.loads(path.read_text())["margins"])
    config = ScanConfig.from_preset("default")
    folder = path.parent / "clean_00"
    images = load_npz(folder / "defender.npz").take(config.samples, seed=config.seed)
    classes = load_task(dataset).classes
    reference = train_reference(images, classes, "cpu", seed=seed)
    margins = max_margins(reference, images.x.shape[1:], classes, MarginConfig())
    path.write_text(json.dumps({"margins": margins.tolist()}) + "\n")
    return margins


def referenced_margin(margins: Sequence[float], references: Sequence[np.ndarray]) -> Verdict:
    """The margin verdict on the audited model's ``margins`` with attractor classes discounted: ``references``
    are the reference networks' per-class margins (their geometric mean is the reference)."""
    from fmt_audit.verdict import MARGIN_FLOOR, margin_verdict

    values = np.asarray(margins, dtype=float)
    values = np.maximum(values, MARGIN_FLOOR * values.max())
    reference = np.exp(np.mean([np.log(np.maximum(r, MARGIN_FLOOR * r.max())) for r in references], axis=0))
    middle = np.median(reference)
    return margin_verdict(values * middle / np.maximum(reference, middle), "referenced margin")


def with_referenced(rows: list[dict]) -> list[dict]:
    """The rows (facts and cached verdicts) with the referenced margin beside, under ``referenced``; one
    reference per dataset."""
    references: dict[str, list[np.ndarray]] = {}
    out = []
    for row in rows:
        dataset = row.get("dataset", "digits")
        if dataset not in references:
            references[dataset] = [reference_margins(dataset, seed) for seed in SEEDS]
        out.append(row | {"referenced": referenced_margin(row["margin"]["margins"], references[dataset]).to_dict()})
    return out


def main() -> None:
    import verdict_population as population

    from fmt_audit.verdict import MARGIN_THRESHOLD

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=population.DATASETS)
    parser.add_argument("--groups", default=",".join(("clean", *population.ATTACKS)))
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--models-per-group", type=int, default=6)
    parser.add_argument("--clean", default=None, metavar="FIRST-LAST",
                        help="the clean models' numbers, when they differ from the attacks' (e.g. 30-39)")
    args = parser.parse_args()
    rows = []
    for attack in args.groups.split(","):
        numbers = range(args.first, args.models_per_group)
        if attack == "clean" and args.clean:
            first, last = map(int, args.clean.split("-"))
            numbers = range(first, last + 1)
        for number in numbers:
            folder = population.folder_of(attack, number, args.dataset)
            if not (folder / "facts.json").exists():
                print(f"{folder.name}: not built, left out", flush=True)
                continue
            facts = json.loads((folder / "facts.json").read_text())
            rows.append({**facts, "margin": population.verdicts(folder, ("margin",))["margin"]})
    rows = with_referenced(rows)
    for row in rows:
        print(json.dumps({k: row.get(k) for k in ("dataset", "attack", "number", "target", "asr")}
                         | {"referenced": (row["referenced"]["suspicion"], row["referenced"]["target_class"])}),
              flush=True)
    print(json.dumps(population.summarise(rows, {"referenced": MARGIN_THRESHOLD})["referenced"]))


if __name__ == "__main__":
    main()
