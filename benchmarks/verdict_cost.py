"""What the verdict costs: the maximum-margin test beside the sink probe, the universal-perturbation ladder,
the transfer test's reference networks and the mask-mode scan, per model.

The maximum-margin test's cost is a conversion to PyTorch, then classes x starts
x steps forward and backward passes of single images, whatever the data and the
channel count: the conversion and the gradient ascent (16 starts, ``--steps``,
200 by default as the scan runs it) are timed apart. The sink probe (64 channels,
eps calibrated) and the mask-mode scan (N images) are timed as the scan runs them; the
universal ladder (conversion included) and the training and measurement of the
transfer test's reference networks on the ladder's perturbations apart, so the
transfer verdict costs the margin test, the ladder and the references.
Each model in a fresh process, one after another, on an otherwise idle machine
(a difference of two noisy timings proved useless under load, so nothing here is
extrapolated).

    python benchmarks/verdict_cost.py sample resnet18 mobilenetv2 [--steps 200] [--samples 256]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

from cases import arguments, model_paths, publish

from fmt_audit.verdict import MarginConfig

DEFAULT_RESTARTS, DEFAULT_STEPS = MarginConfig.restarts, MarginConfig.steps


def measure(model: str, data: str, steps: int, samples: int) -> dict:
    """One model's timings, in this process."""
    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.backends.torch.logits import class_count
    from fmt_audit.data import load_data
    from fmt_audit.fmt.scan import ScanConfig, model_verdict, scan
    from fmt_audit.model.loading import load_model
    from fmt_audit.verdict.evidence.transfer import transfer_to_references
    from fmt_audit.verdict.evidence.universal import universal_test
    from fmt_audit.verdict.margin import max_margins

    loaded = load_model(model)
    config = ScanConfig(samples=samples, verdict="none")
    started = time.perf_counter()
    report = scan(loaded, data, config)
    mask_s = time.perf_counter() - started
    started = time.perf_counter()
    classifier = BridgedClassifier(to_torch(loaded.proto), config.preprocessing, "cpu")
    convert_s = time.perf_counter() - started
    image = loaded.image_input
    shape = (image.channels, image.height, image.width)
    classes = class_count(classifier, shape)
    started = time.perf_counter()
    max_margins(classifier, shape, classes, MarginConfig(restarts=DEFAULT_RESTARTS, steps=steps))
    ascent_s = time.perf_counter() - started
    dataset = load_data(data, image, loaded.num_classes).take(samples, seed=config.seed)
    started = time.perf_counter()
    model_verdict(loaded, dataset, replace(config, verdict="sink"), list(loaded.layers), [])
    sink_s = time.perf_counter() - started
    started = time.perf_counter()
    ladder, _ = universal_test(loaded.proto, image, config.preprocessing, dataset, "cpu", config.universal_config())
    universal_s = time.perf_counter() - started
    started = time.perf_counter()
    transfer_to_references(ladder, dataset, classes, "cpu", config.reference_config(), config.seed)
    references_s = time.perf_counter() - started
    return {"classes": classes, "channels": sum(layer.channels for layer in report.layers),
            "mask_scan_s": round(mask_s, 1), "sink_probe_s": round(sink_s, 1), "convert_s": round(convert_s, 1),
            "margin_ascent_s": round(ascent_s, 1), "margin_s": round(convert_s + ascent_s, 1),
            "universal_s": round(universal_s, 1), "rungs": len(ladder.budgets), "references_s": round(references_s, 1),
            "transfer_s": round(convert_s + ascent_s + universal_s + references_s, 1),
            "shortcut_s": round(convert_s + universal_s + references_s, 1)}


def main() -> None:
    parser = arguments(__doc__, "", 256)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="margin ascent steps per start")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DATA"), help="measure one model in this process")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.samples)))
        return
    rows = []
    for name in args.models:
        for label, model, data in model_paths(name):
            out = subprocess.run([sys.executable, __file__, "--one", str(model), str(data), "--steps",
                                  str(args.steps), "--samples", str(args.samples)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append({"model": label, **json.loads(out.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    header = ["model", "classes", "channels", "mask_scan_s", "sink_probe_s", "convert_s", "margin_ascent_s",
              "margin_s", "universal_s", "rungs", "references_s", "transfer_s", "shortcut_s"]
    publish(rows, header, f"verdict_cost_{'-'.join(args.models)}_s{args.steps}_n{args.samples}_threads{os.cpu_count()}")


if __name__ == "__main__":
    main()
