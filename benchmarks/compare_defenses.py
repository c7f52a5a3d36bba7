"""Every repair method side by side (``fmt-audit compare``): ACC / ASR / RA / DER per model.

For each model with a known trigger, :func:`fmt_audit.repair.comparison.compare` runs
``fmt`` (the scan with ``--preset``, removal, fine-tuning with unlearning),
``ft`` (fine-tuning alone), ``fp`` (Fine-Pruning) and ``clp`` (data-free CLP)
on the same defender data, recipe and seed, and measures each repaired graph in
ONNX Runtime on the same test images.

    python benchmarks/compare_defenses.py matrix:cifar10-preact18q-badnets-p10,cifar10-preact18q-blended-p10
    python benchmarks/compare_defenses.py sample --epochs 5

Prints a Markdown table and writes the rows to ``benchmarks/results/``.
"""

from __future__ import annotations

import os

from cases import arguments, cases, publish

HEADER = ["model", "method", "removed", "ACC", "ASR", "RA", "DER", "time s"]


def main() -> None:
    parser = arguments(__doc__, "default", 256)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--methods", default="fmt,ft,fp,clp")
    args = parser.parse_args()

    from fmt_audit.data import Dataset
    from fmt_audit.fmt.scan import ScanConfig
    from fmt_audit.repair.comparison import compare
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig

    rows = []
    for name in args.models:
        for label, model, defender, target, test, triggered, mean, std in cases(name):
            result = compare(model, defender, test, Dataset(triggered, test.y, "triggered test images"), target,
                             methods=args.methods.split(","),
                             config=RepairConfig(FineTuneConfig(epochs=args.epochs, seed=args.seed)),
                             scan_config=ScanConfig.from_preset(args.presets, samples=args.samples, seed=args.seed,
                                                                mean=mean, std=std),
                             on_method=lambda method, label=label: print(f"{label}: {method} ...", flush=True))
            b = result.baseline
            rows.append({"model": label, "method": "none (as given)", "removed": 0, "ACC": round(b.acc, 4),
                         "ASR": round(b.asr, 4), "RA": round(b.ra, 4), "DER": "–", "time s": 0})
            for o in result.outcomes:
                if o.error:
                    rows.append({"model": label, "method": o.method, "removed": "–", "ACC": "–", "ASR": "–",
                                 "RA": "–", "DER": "–", "time s": f"failed: {o.error}"})
                    continue
                m = o.metrics
                rows.append({"model": label, "method": o.method, "removed": o.removed, "ACC": round(m.acc, 4),
                             "ASR": round(m.asr, 4), "RA": round(m.ra, 4), "DER": round(o.der, 4),
                             "time s": round(o.seconds, 1)})
    publish(rows, HEADER, f"compare_{'_'.join(args.models)}_{args.presets}_e{args.epochs}_threads{os.cpu_count()}")


if __name__ == "__main__":
    main()
