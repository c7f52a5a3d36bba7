"""What does a repair do? ACC / ASR / RA before and after, FMT next to fine-tuning alone.

For each model with a known trigger, on the same defender data, holdout split,
seed and fine-tuning recipe:

* ``fine-tuning``: no channel removed, fine-tuned (the baseline defense);
* ``unlearning only``: no channel removed, fine-tuned with feature-map perturbations;
* ``FMT <preset> (published repair)``: the scan's flagged channels removed, held at zero, fine-tuned;
* ``FMT <preset>, regrowth``: the same channels zeroed but free to regrow (the reference code);
* ``removal only``: the flagged channels removed, no fine-tuning;
* ``FMT <preset> + unlearning``: removal and fine-tuning with feature-map perturbations (the default).

Scans run once per model, preset and version of the scan's code on the repair's training split and are
cached next to the model (``scan_<preset>_n<N>_seed<S>_<code>.json``), so reruns only fine-tune.

    python benchmarks/repair_cifar.py sample --presets gradient
    python benchmarks/repair_cifar.py matrix:cifar10-preact18q-badnets-p10,cifar10-preact18q-blended-p10

Prints a Markdown table and writes the rows to ``benchmarks/results/``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from cases import arguments, cases, publish

FMT_CODE = Path(__file__).resolve().parents[1] / "fmt_audit" / "fmt"

HEADER = ["model", "method", "removed", "ACC", "ASR", "RA", "DER", "holdout ACC", "time s"]


def code_version() -> str:
    """A short hash of the scan's code: a cached scan is reused only by the code that made it."""
    digest = hashlib.sha256()
    for path in sorted(FMT_CODE.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def cached_scan(model_path: Path, train, preset: str, samples: int, seed: int, cache: Path | None, mean, std):
    """The scan report of ``model_path`` on ``train`` (read from ``cache`` if this code made it before)."""
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.report.json_report import ScanReport

    target = cache / f"scan_{preset}_n{samples}_seed{seed}_{code_version()}.json" if cache else None
    if target and target.exists():
        return ScanReport.read(target)
    config = ScanConfig.from_preset(preset, samples=samples, seed=seed, mean=mean, std=std)
    report = scan(model_path, train, config, verdict=None)
    if target:
        target.write_text(report.to_json())
    return report


def main() -> None:
    parser = arguments(__doc__, "default", 256)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    import onnx

    from fmt_audit.data import Dataset, Preprocessing, load_npz
    from fmt_audit.fmt.scan import ScanConfig
    from fmt_audit.model.loading import load_model
    from fmt_audit.repair.config import FineTuneConfig
    from fmt_audit.repair.evaluation import evaluate
    from fmt_audit.repair.pipeline import RepairConfig, repair, unlearning_eps

    rows = []
    for label, model_path, defender, target, test, triggered, mean, std in (c for n in args.models
                                                                            for c in cases(n)):
        loaded = load_model(model_path)
        data = load_npz(defender)
        poisoned = Dataset(triggered, test.y)
        config = RepairConfig(FineTuneConfig(epochs=args.epochs, seed=args.seed), unlearn=True)
        train, _ = data.split(config.holdout, seed=args.seed)
        scan_config = ScanConfig(seed=args.seed, mean=mean, std=std)
        preprocessing = Preprocessing(mean, std)
        cache = Path(model_path).parent if label.startswith("matrix") else None
        before = evaluate(loaded, test, poisoned, target, preprocessing=preprocessing)

        def record(method, removed, result, seconds, label=label, test=test, poisoned=poisoned, target=target,
                   loaded=loaded, preprocessing=preprocessing):
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "repaired.onnx"
                onnx.save(result.model, str(path))
                after = evaluate(path, test, poisoned, target, baseline=loaded, preprocessing=preprocessing)
            m = after.metrics
            row = {"model": label, "method": method, "removed": removed, "ACC": round(m.acc, 4),
                   "ASR": round(m.asr, 4), "RA": round(m.ra, 4), "DER": round(after.der, 4),
                   "holdout ACC": result.report.accuracy["after"], "time s": round(seconds, 1),
                   "epochs": result.report.epochs}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "epochs"}), flush=True)

        b = before.metrics
        rows.append({"model": label, "method": "none (backdoored)", "removed": 0, "ACC": round(b.acc, 4),
                     "ASR": round(b.asr, 4), "RA": round(b.ra, 4), "DER": "-", "holdout ACC": "-", "time s": 0})
        published = RepairConfig(config.fine_tune, unlearn=False)
        # the unlearning eps, calibrated once per model as repair would (see fmt_audit.repair.pipeline)
        eps, trace, _ = unlearning_eps(config, None, loaded, train, scan_config)
        print(json.dumps({"model": label, "unlearn_eps": eps, "calibration": trace}), flush=True)
        config = replace(config, unlearn_eps=eps)
        started = time.perf_counter()
        record("fine-tuning", 0, repair(loaded, data, published, scan_config, flagged={}),
               time.perf_counter() - started)
        started = time.perf_counter()
        record("unlearning only", 0, repair(loaded, data, config, scan_config, flagged={}),
               time.perf_counter() - started)
        for preset in args.presets.split(","):
            started = time.perf_counter()
            report = cached_scan(model_path, train, preset, args.samples, args.seed, cache, mean, std)
            scanned = time.perf_counter() - started
            n = report.flagged_count
            for method, settings in (
                    (f"FMT {preset} (published repair)", published),
                    (f"FMT {preset}, regrowth", RepairConfig(config.fine_tune, allow_regrowth=True, unlearn=False)),
                    (f"{preset} removal only", RepairConfig(FineTuneConfig(epochs=0))),
                    (f"FMT {preset} + unlearning (fmt-audit default)", config)):
                started = time.perf_counter()
                result = repair(loaded, data, settings, scan_config, flagged=report)
                record(method, n, result, time.perf_counter() - started + scanned)
    publish(rows, HEADER, f"repair_{'_'.join(args.models)}_{args.presets.replace(',', '-')}_n{args.samples}")


if __name__ == "__main__":
    main()
