"""The trace where the verdict's warp search decided (docs/research/trace-warp.md): removal only, no fine-tuning.

Per model (a benchmark case), on the cell's training split (1,800 of its 2,000 defender images, seed 0, as the
repair splits them): the default `combined` verdict (with its warp search: cached beside the cell as
``verdict_combined-warp_train_seed0.json``; ``verdict_combined_train_seed0.json`` is the verdict before the warp
search), then `fmt_audit.fmt.trace.trace_verdict` (the warp trace where the warp decided), then, on the cell's
test images through ONNX Runtime with masks at 0: ACC and ASR as given, with the traced channels removed, and
with as many random channels per layer (seed 0). Rows go to ``research/results/trace_warp_TAG.jsonl`` as they
come; a model already there is skipped.

    cd benchmarks && PYTHONPATH=..:.:../research OMP_NUM_THREADS=1 python ../research/trace_warp.py \\
        matrix:mnist-lenet-wanet-p10-r2,mnist-lenet-clean-r2 --tag dev
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def verdict_of(folder: Path, loaded, train, preprocessing, seed: int):
    """The default verdict on the training split (cached as the Verdict's fields)."""
    from fmt_audit.repair.selfcheck import verdict_on
    from fmt_audit.verdict import Verdict, VerdictConfig

    path = folder / f"verdict_combined-warp_train_seed{seed}.json"
    if path.exists():
        return Verdict(**json.loads(path.read_text())), None
    started = time.perf_counter()
    found = verdict_on(loaded, loaded.proto, train, preprocessing, "cpu", VerdictConfig(seed=seed))
    fields = {"method": found.method, "suspicion": found.suspicion, "verdict": found.verdict,
              "target_class": found.target_class, "threshold": found.threshold, "basis": found.basis,
              "details": found.details}
    path.write_text(json.dumps(fields, default=float))
    return found, round(time.perf_counter() - started, 1)


def one_case(case, seed: int) -> dict:
    from removal import acc_asr, opened, random_like

    from fmt_audit.fmt.trace import trace_verdict

    folder = Path(case.model).parent
    loaded, masked, classifier, data = opened(case)
    train, _ = data.split(0.1, seed=seed)
    verdict, verdict_s = verdict_of(folder, loaded, train, preprocessing=classifier.preprocessing, seed=seed)
    started = time.perf_counter()
    trace = trace_verdict(classifier, loaded.layers, train, verdict, seed)
    trace_s = round(time.perf_counter() - started, 1)
    flagged = {name: channels for name, channels in trace.pop("layers", {}).items() if channels}
    sizes = {layer.name: layer.out_channels for layer in loaded.layers}
    count = sum(map(len, flagged.values()))
    acc, asr = acc_asr(masked, case, {})
    row = {"model": case.label, "verdict": verdict.verdict, "class": verdict.target_class,
           "decided_by": verdict.details.get("decided_by"), "warp_lead": verdict.details.get("warp_lead"),
           "target": case.target, "ACC": acc, "ASR": asr, "trace": trace, "flagged": count,
           "share": round(count / sum(sizes.values()), 4), "verdict s": verdict_s, "trace s": trace_s,
           "onnx sha256": loaded.sha256[:16]}
    if count:
        a, s = acc_asr(masked, case, flagged)
        ra, rs = acc_asr(masked, case, random_like(flagged, sizes, 0))
        row |= {"ACC removed": a, "ASR removed": s, "ACC random": ra, "ASR random": rs}
    return row


def main() -> None:
    from cases import cases

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases")
    parser.add_argument("--tag", default="dev")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = RESULTS / f"trace_warp_{args.tag}.jsonl"
    done = {json.loads(line)["model"] for line in results.read_text().splitlines()} if results.exists() else set()
    for case in cases(args.cases, clean=True):
        if case.label in done:
            continue
        row = one_case(case, args.seed)
        with results.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
