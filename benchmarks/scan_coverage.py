"""How well does a scan find the backdoor feature maps? Oracle coverage, and what removing the flagged does.

For each model with a known trigger, runs ``scan`` under several presets on the
same defender data and seed, and reports per preset:

* channels flagged (count and share of all Conv channels);
* the trigger-response oracle (the benchmarks' `oracle.py`): how many of its
  channels are flagged (recall), how many flagged channels are oracle channels
  (precision; compare with the oracle's base rate), and the ranking quality of
  the scan's per-layer z-scores against it (ROC AUC, threshold-free);
* the causal check: ACC and ASR of the model with the flagged channels removed
  (masks at 0, no fine-tuning), next to the same number of random channels per
  layer removed (seeded) — a scan that finds the backdoor beats random removal.

    python benchmarks/scan_coverage.py sample                       # bundled sample models, ~2 min on 2 cores
    python benchmarks/scan_coverage.py matrix:cifar10-preact18q,cifar10-vgg --samples 64   # matrix.py's models

Prints a Markdown table and writes the rows to ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import time

import numpy as np
from cases import arguments, cases, publish

HEADER = ["model", "preset", "N", "channels", "oracle", "flagged", "flagged %", "recall %", "precision %",
          "base rate %", "AUC", "ACC", "ASR", "ACC pruned", "ASR pruned", "ACC random", "ASR random", "time s"]


def ranking_auc(report, response) -> float:
    """ROC AUC of the per-channel suspicion, z-scored within each layer, against the oracle."""
    from sklearn.metrics import roc_auc_score

    from fmt_audit.fmt.selection import robust_z

    labels, values = [], []
    for layer in report.layers:
        suspicion = (1 - np.asarray(layer.scores) if report.config["score"] == "accuracy"
                     else np.asarray(layer.shift)).max(axis=1)
        values.append(robust_z(suspicion, report.config["samples"]))
        labels.append(response.shift[layer.name] > response.threshold)
    labels, values = np.concatenate(labels), np.concatenate(values)
    return float(roc_auc_score(labels, values)) if 0 < labels.sum() < len(labels) else float("nan")


def acc_asr(model, test, triggered, target, removed) -> tuple[float, float]:
    victims = test.y != target
    acc = float((model.predict(test.x, removed) == test.y).mean())
    asr = float((model.predict(triggered[victims], removed) == target).mean())
    return round(acc, 4), round(asr, 4)


def main() -> None:
    args = arguments(__doc__, "default,gradient,paper", 200).parse_args()

    from oracle import trigger_response

    from fmt_audit.backends.onnxrt.masked import MaskedModel
    from fmt_audit.data import Preprocessing
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.model.loading import load_model

    rows = []
    for label, model_path, defender, target, test, triggered, mean, std in (c for n in args.models
                                                                            for c in cases(n)):
        loaded = load_model(model_path)
        masked = MaskedModel(loaded.proto, "cpu", Preprocessing(mean, std))
        victims = test.y != target
        response = trigger_response(masked, test.x[victims], triggered[victims])
        total = sum(layer.out_channels for layer in loaded.layers)
        base = acc_asr(masked, test, triggered, target, None)
        for preset in args.presets.split(","):
            config = ScanConfig.from_preset(preset, samples=args.samples, seed=args.seed, mean=mean, std=std)
            started = time.perf_counter()
            report = scan(loaded, defender, config, verdict=None)
            seconds = time.perf_counter() - started
            flagged = report.flagged
            rng = np.random.default_rng(args.seed)
            random = {layer.name: sorted(rng.choice(layer.channels, len(layer.flagged), replace=False).tolist())
                      for layer in report.layers}
            hits = response.hits(flagged)
            n_flagged = report.flagged_count
            values = [label, preset, report.config["samples"], total,
                      response.count, n_flagged, round(100 * n_flagged / total, 1),
                      round(100 * response.coverage(flagged), 1),
                      round(100 * hits / n_flagged, 1) if n_flagged else "-",
                      round(100 * response.count / total, 1), round(ranking_auc(report, response), 3),
                      *base, *acc_asr(masked, test, triggered, target, flagged),
                      *acc_asr(masked, test, triggered, target, random), round(seconds, 1)]
            rows.append(dict(zip(HEADER, values)))
            print(json.dumps(rows[-1]), flush=True)
    publish(rows, HEADER, f"scan_coverage_{'_'.join(args.models)}_n{args.samples}")


if __name__ == "__main__":
    main()
