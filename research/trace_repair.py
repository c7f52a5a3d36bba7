"""Issue 31: the whole repair with trace selection against today's default, and re-activation.

For each backdoored matrix cell, on the same defender data, split, seed and fine-tuning recipe as
``fmt-audit repair`` (10 epochs; the training split scans, the holdout split measures):

* the ``combined`` verdict on the training split, then the trace (``fmt_audit.fmt.trace``) of its class;
* ``trace removal only`` (no fine-tuning), ``trace + fine-tuning``, ``trace + unlearning``;
* ``default removal only``: the per-channel default scan's flags removed, no fine-tuning
  (docs/research/scan-trace-h2h.md);
* ``unlearning only`` and ``fine-tuning only`` (no channel removed);
* ``default + unlearning``: today's default repair (the per-channel scan at N = 256, then unlearning);
* ``i-BAU`` and ``ANP``: ``repair --method ibau|anp`` at their references' defaults (no fine-tuning);
* ``trace + stamp unlearning`` (pre-registered in docs/research/repair-stamp-unlearning.md): ``trace +
  unlearning`` with half of the unlearning copies the clean images stamped with one of the trace's reversed
  triggers (true labels) instead of feature-map perturbations;
* ``trace + targeted stamp unlearning`` and ``trace + stamp-only unlearning`` (pre-registered in
  docs/research/repair-targeted-unlearning.md): ``trace + stamp unlearning`` whose feature-map copies are kept
  only where they send the model to the traced class (else the clean image), or never;
* ``trace + unlearning (self-checked)`` (docs/research/repair-self-check.md): the product's own path, ``fmt-audit
  repair --selection trace`` with its self-check: the verdict and trace run inside the repair, then the verdict
  on the repaired model, and where it still finds the backdoor the one stronger setting; the row keeps the
  self-check's word and what the stronger setting did (from 50589e2 the product's path stamps the trace's
  reversed triggers into the unlearning: rows before and after it are different repairs);
* ``trace + unlearning (re-traced)`` (docs/research/repair-retrace.md): ``trace + unlearning``, then the verdict
  on the repaired model (the self-check's); where it still finds a backdoor, the trace of the class it names on
  the repaired model, those channels removed too, and the unlearning again from the repaired model (instead of
  the self-check's stronger try);
* ``staged`` (pre-registered in docs/research/set-selection.md, "Staged repair"): nothing when the verdict
  is not suspicious; else remove the traced channels, run the verdict again on the cut model (same images,
  seed), keep the cut when it is clean and cost at most 2 points of holdout accuracy, fine-tune from it when
  it is clean but cost more, unlearn from it when the verdict still finds the backdoor. Its row is the
  chosen method's (run here unless already a row), with the decision under ``stage``.

Each repaired model (and the model as given) is then fine-tuned one epoch on the defender data with 1% of it
replaced by triggered images labelled as the target (the attack's own trigger, ``benchmarks/matrix.py``):
``reactivated ASR`` says how much of the backdoor comes back.

Rows go to ``research/results/trace_repair_<tag>.jsonl`` as they come; a cell's method already there is
skipped, so a rerun resumes. The verdict, the trace and the default scan are cached next to the cell;
``--keep-models`` also keeps each repaired model there.

    cd benchmarks && PYTHONPATH=. OMP_NUM_THREADS=1 python ../research/trace_repair.py \\
        matrix:cifar10-vgg-badnets-p10 --tag dev
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from cases import cases

RESULTS = Path(__file__).resolve().parent / "results"
REACTIVATION_SHARE = 0.01
METHODS = ("trace removal only", "default removal only", "trace + fine-tuning", "trace + unlearning",
           "unlearning only", "fine-tuning only", "default + unlearning", "staged", "i-BAU", "ANP",
           "trace + distilled unlearning", "trace + stamp unlearning", "trace + unlearning (self-checked)",
           "trace + unlearning (re-traced)", "trace + targeted stamp unlearning", "trace + stamp-only unlearning",
           "trace + distilled unlearning (self-checked)", "trace + universal unlearning (self-checked)",
           "trace + re-fitted universal unlearning (self-checked)")
# docs/research/repair-targeted-unlearning.md: which feature-map copies the stamp unlearning keeps
KEPT_COPIES = {"trace + stamp unlearning": "all", "trace + targeted stamp unlearning": "targeted",
               "trace + stamp-only unlearning": "none"}
# trace + stamp unlearning: the share of the unlearning copies that carry a reversed trigger (fixed before any row)
STAMP_SHARE = 0.5
# trace + distilled unlearning: the clean images' loss is (1 - weight) x cross-entropy + weight x T^2 x KL from the
# model as given at temperature T; fixed by docs/research/repair-distillation.md (both of its tests)
DISTILL_WEIGHT, DISTILL_TEMPERATURE = 0.5, 2.0
# staged: the cut is kept when the verdict then finds nothing and the holdout lost at most this much accuracy
STAGED_ACC_DROP = 0.02
SELF_CHECKED = "trace + unlearning (self-checked)"
# docs/research/repair-distillation.md, third test: the repair that ships with the distilled clean loss
DISTILLED_CHECKED = "trace + distilled unlearning (self-checked)"
RETRACED = "trace + unlearning (re-traced)"
# docs/research/repair-universal-unlearning.md: the shipped repair, a share of every unlearning copy being the clean
# image plus the named class's universal perturbation (fitted once on the model as given at the budget where the
# verdict's ladder stopped); share, images and steps fixed before any row
UNIVERSAL_CHECKED = "trace + universal unlearning (self-checked)"
UNIVERSAL_SHARE, UNIVERSAL_IMAGES, UNIVERSAL_STEPS = 0.25, 256, 100
# development variant: the perturbation fitted again on the model under repair at each epoch's start, from the
# last one, REFIT_STEPS steps (i-BAU's view: the perturbation the repaired model still answers to)
UNIVERSAL_REFITTED = "trace + re-fitted universal unlearning (self-checked)"
REFIT_STEPS = 20


def frozen(model, preprocessing):
    """``model`` (an ONNX graph) converted afresh, on pixel-space images, eval mode and no parameter gradients: a
    copy that the repair's fine-tuning does not touch."""
    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.backends.torch.logits import freeze

    classifier = BridgedClassifier(to_torch(model), preprocessing, "cpu")
    freeze(classifier)
    return classifier


def cached_json(path: Path, make):
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    partial = path.with_suffix(".partial")     # whole or absent: another queue may read it at any time
    partial.write_text(json.dumps(value))
    partial.replace(path)
    return value


def poisoned_defender(train, attack: str, target: int, seed: int):
    """``train`` with 1% of its images (not of the target) replaced by triggered ones labelled ``target``."""
    from matrix import apply_trigger

    from fmt_audit.data import Dataset

    rng = np.random.default_rng(seed)
    count = max(1, round(REACTIVATION_SHARE * len(train)))
    chosen = np.sort(rng.choice(np.flatnonzero(train.y != target), size=count, replace=False))
    x, y = train.x.copy(), train.y.copy()
    as_uint8 = np.clip(np.rint(x[chosen] * 255), 0, 255).astype(np.uint8)
    x[chosen] = apply_trigger(attack, as_uint8).astype(np.float32) / 255
    y[chosen] = target
    return Dataset(x, y)


def distilled_from(teacher):
    """The clean loss of ``trace + distilled unlearning`` (``fine_tune``'s ``clean_loss``), ``teacher`` the model
    as given (a frozen classifier on pixel-space images)."""
    import torch
    import torch.nn.functional as F

    from fmt_audit.backends.torch.logits import as_logits

    def clean_loss(x, y, logits):
        with torch.no_grad():
            taught = F.log_softmax(as_logits(teacher(x)) / DISTILL_TEMPERATURE, 1)
        kl = F.kl_div(F.log_softmax(logits / DISTILL_TEMPERATURE, 1), taught, log_target=True, reduction="batchmean")
        return (1 - DISTILL_WEIGHT) * F.cross_entropy(logits, y) + DISTILL_WEIGHT * DISTILL_TEMPERATURE ** 2 * kl

    return clean_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tag", default="dev")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clean", action="store_true",
                        help="the clean twins too: ACC, and the verdict on each repaired model (no ASR)")
    parser.add_argument("--keep-models", action="store_true",
                        help="write each repaired model beside the cell: repaired_<tag>_<method>.onnx (for "
                             "diagnostics that need the model, not only its figures)")
    args = parser.parse_args()
    out = RESULTS / f"trace_repair_{args.tag}.jsonl"
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done.add((row["model"], row["method"]))
    requested = args.methods.split(",")
    unknown = [m for m in requested if m not in METHODS]
    if unknown:     # a typo (or a name with a comma) would otherwise run other methods than asked, or none
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    wanted = [m for m in METHODS if m in requested]

    def write(row: dict) -> None:
        done.add((row["model"], row["method"]))
        print(json.dumps(row), flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    for case in (c for name in args.models for c in cases(name, clean=args.clean)):
        one_case(case, args, done, write, wanted)


def one_case(case, args, done: set, write, wanted: list[str]) -> None:
    """Every method of ``wanted`` not yet ``done`` on one matrix case, written as it comes."""
    import onnx

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.data import Dataset, Preprocessing, load_npz
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.fmt.trace import TraceConfig, trace_channels, trace_verdict, untraceable
    from fmt_audit.model.loading import load_model
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig
    from fmt_audit.repair.evaluation import evaluate
    from fmt_audit.repair.pipeline import repair, unlearning_eps
    from fmt_audit.repair.selfcheck import verdict_on
    from fmt_audit.verdict import VerdictConfig

    folder = Path(case.model).parent
    facts = json.loads((folder / "facts.json").read_text())
    loaded = load_model(case.model)
    # which model a row is of: a cell retrained on the CPU in another session is not always the same file
    # (gtsrb-preact18q-badnets-p10-r1 was not, fifteenth session), and rows compared must share a model
    unnamed, digest = write, loaded.sha256[:16]

    def write(row: dict) -> None:
        unnamed({**row, "onnx sha256": digest})

    preprocessing = Preprocessing(case.mean, case.std)
    data = load_npz(case.defender)
    config = RepairConfig(FineTuneConfig(epochs=args.epochs, seed=args.seed), unlearn=True)
    train, _ = data.split(config.holdout, seed=args.seed)
    scan_config = ScanConfig(seed=args.seed, mean=case.mean, std=case.std)
    twin = case.triggered is None       # a clean twin: nothing to trigger, nothing to re-activate
    poisoned = None if twin else Dataset(case.triggered, case.test.y)
    relearn_data = None if twin else poisoned_defender(data, facts["attack"], case.target, args.seed)

    def measured(model, label=case.label, test=case.test, poisoned=poisoned, target=case.target,
                 loaded=loaded, preprocessing=preprocessing):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save(model, str(path))
            m = evaluate(path, test, poisoned, target, baseline=loaded, preprocessing=preprocessing)
        return m

    def reactivated(model, relearn_data=relearn_data, scan_config=scan_config):
        """ASR (and ACC) after one epoch of fine-tuning on the 1%-poisoned defender data."""
        relearn = RepairConfig(FineTuneConfig(epochs=1, seed=args.seed + 1), method="ft")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save(model, str(path))
            result = repair(path, relearn_data, relearn, scan_config)
        m = measured(result.model).metrics
        return {"reactivated ACC": round(m.acc, 4), "reactivated ASR": round(m.asr, 4)}

    def rounded(value):
        return None if value is None else round(value, 4)

    if (case.label, "none") not in done:
        m = measured(loaded.proto).metrics
        write({"model": case.label, "method": "none", "ACC": round(m.acc, 4), "ASR": rounded(m.asr),
               "RA": rounded(m.ra), **({} if twin else reactivated(loaded.proto))})

    started = time.perf_counter()
    check = VerdictConfig()
    found = cached_json(folder / f"verdict_combined_train_seed{args.seed}.json",
                        lambda: verdict_on(loaded, loaded.proto, train, preprocessing, "cpu", check).to_dict())
    verdict_s = time.perf_counter() - started

    def traced_anew(found=found, loaded=loaded, train=train, preprocessing=preprocessing):
        classifier = frozen(loaded.proto, preprocessing)
        norms = np.asarray(found["norms"], dtype=float)
        target = int(found["target_class"])
        return trace_channels(classifier, loaded.layers, train, target,
                              float(np.median(np.delete(norms, target))), TraceConfig(seed=args.seed))

    stamps_path = folder / f"trace_stamps_train_seed{args.seed}.npz"

    def keep_stamps(result, reproduced: bool) -> None:
        """The trace's reversed triggers beside the cell (written whole: a kill leaves no half file)."""
        shape = train.x.shape[1:]
        pairs = [(m.numpy(), p.numpy()) for m, p in result.stamps]
        partial = stamps_path.with_suffix(".partial.npz")
        np.savez(partial, reproduced=reproduced,
                 masks=np.stack([m for m, _ in pairs]) if pairs else np.zeros((0, 1, *shape[1:]), np.float32),
                 patterns=np.stack([p for _, p in pairs]) if pairs else np.zeros((0, *shape), np.float32))
        partial.replace(stamps_path)

    def traced(found=found):
        if found["verdict"] != "suspicious" or not found.get("norms"):
            return {"flagged": {}, "rounds": [], "stop": f"verdict {found['verdict']}"}
        result = traced_anew()
        keep_stamps(result, True)      # from the same trace as the channels
        return {**result.to_dict(), "flagged": result.flagged}

    started = time.perf_counter()
    trace = cached_json(folder / f"trace_train_seed{args.seed}.json", traced)
    trace_s = time.perf_counter() - started
    trace_flagged = trace["flagged"]
    eps, _, _ = unlearning_eps(config, None, loaded, train, scan_config)
    unlearn = replace(config, unlearn_eps=eps)
    tune_only = RepairConfig(config.fine_tune, unlearn=False)
    print(json.dumps({"model": case.label, "verdict": found["verdict"], "class": found["target_class"],
                      "suspicion": found["suspicion"], "trace flagged": sum(map(len, trace_flagged.values())),
                      "stop": trace.get("stop"), "unlearn eps": eps, "verdict s": round(verdict_s),
                      "trace s": round(trace_s)}), file=sys.stderr, flush=True)

    def default_flags(folder=folder, loaded=loaded, train=train, scan_config=scan_config):
        found_scans = sorted(folder.glob(f"scan_default_n256_seed{args.seed}_*.json"))
        if found_scans:
            from fmt_audit.report.json_report import ScanReport
            return ScanReport.read(found_scans[-1]).flagged, found_scans[-1].name
        report = scan(loaded, train, scan_config, verdict=None)
        name = f"scan_default_n256_seed{args.seed}_trace-repair.json"
        (folder / name).write_text(report.to_json())
        return report.flagged, name

    def default_plan(settings):
        """The per-channel default scan's flags, ``settings``, and the scan file they come from."""
        flags, name = default_flags()
        return flags, settings, name

    plans = {
        "trace removal only": lambda: (trace_flagged, RepairConfig(FineTuneConfig(epochs=0)), "trace"),
        # docs/research/scan-trace-h2h.md: the per-channel default scan's flags alone (its scan cached for
        # research/flag_removal.py beside the trace)
        "default removal only": lambda: default_plan(RepairConfig(FineTuneConfig(epochs=0))),
        "trace + fine-tuning": lambda: (trace_flagged, tune_only, "trace"),
        "trace + unlearning": lambda: (trace_flagged, unlearn, "trace"),
        "trace + distilled unlearning": lambda: (trace_flagged, unlearn, "trace"),
        "trace + stamp unlearning": lambda: (trace_flagged, unlearn, "trace"),
        "trace + targeted stamp unlearning": lambda: (trace_flagged, unlearn, "trace"),
        "trace + stamp-only unlearning": lambda: (trace_flagged, unlearn, "trace"),
        # the repair finds its own channels (verdict and trace on the training split), as the CLI does
        SELF_CHECKED: lambda: (None, unlearn, "the repair's own trace"),
        DISTILLED_CHECKED: lambda: (None, unlearn, "the repair's own trace"),
        UNIVERSAL_CHECKED: lambda: (None, unlearn, "the repair's own trace"),
        UNIVERSAL_REFITTED: lambda: (None, unlearn, "the repair's own trace"),
        RETRACED: lambda: (trace_flagged, unlearn, "trace, and the repaired model's where the backdoor may persist"),
        "unlearning only": lambda: ({}, unlearn, "none"),
        "fine-tuning only": lambda: ({}, tune_only, "none"),
        "default + unlearning": lambda: default_plan(unlearn),
        # the field's defenses at their references' defaults, on the same data and split
        "i-BAU": lambda: (None, RepairConfig(config.fine_tune, method="ibau"), "none"),
        "ANP": lambda: (None, RepairConfig(config.fine_tune, method="anp"), "anp"),
    }
    def retraced(first, flagged: dict, loaded=loaded, train=train, preprocessing=preprocessing):
        """The verdict on ``first``'s repaired model; where it is suspicious, the trace of its class on that model,
        and the repair again from it, those channels removed beside ``flagged`` (held at zero again)."""
        after = verdict_on(loaded, first.model, train, preprocessing, "cpu", check)
        brief = {"verdict": after.verdict, "class": after.target_class, "suspicion": after.suspicion}
        if untraceable(after):
            return first, {"verdict after": brief, "re-trace": None}
        again = trace_verdict(BridgedClassifier(to_torch(first.model), preprocessing, "cpu"), loaded.layers, train,
                              after, args.seed)
        layers = again.pop("layers")
        both = {name: sorted(set(flagged.get(name, ())) | set(layers.get(name, ()))) for name in {**flagged, **layers}}
        second = repair(replace(loaded, proto=first.model), data, unlearn, scan_config, flagged=both)
        return second, {"verdict after": brief, "re-trace": again}

    def stamps() -> tuple[list, bool | str]:
        """The trace's reversed triggers, and whether they come from the trace whose channels are cut (a trace
        cached before the stamps were kept is run again: True where it gave the same channels); "nothing
        traced" where the verdict named no class."""
        if found["verdict"] != "suspicious" or not found.get("norms"):
            return [], "nothing traced"
        if not stamps_path.exists():
            result = traced_anew()
            keep_stamps(result, result.flagged == trace_flagged)
        with np.load(stamps_path) as saved:
            # a file written before 9ff9cef does not say (the stamp study's development rows used such files)
            reproduced = bool(saved["reproduced"]) if "reproduced" in saved.files else "not recorded"
            return list(zip(saved["masks"], saved["patterns"])), reproduced

    def staged() -> dict:
        """Which method the staged rule picks on this cell, and why."""
        if found["verdict"] != "suspicious":
            return {"picked": "none", "why": f"verdict {found['verdict']}"}
        cut = repair(loaded, data, RepairConfig(FineTuneConfig(epochs=0)), scan_config, flagged=trace_flagged)
        after = verdict_on(loaded, cut.model, train, preprocessing, "cpu", check).to_dict()
        drop = cut.report.accuracy["before"] - cut.report.accuracy["after_removal"]
        picked = ("trace + unlearning" if after["verdict"] == "suspicious" else
                  "trace removal only" if drop <= STAGED_ACC_DROP else "trace + fine-tuning")
        return {"picked": picked, "verdict after cut": after["verdict"], "class after cut": after["target_class"],
                "holdout drop of the cut": round(drop, 4)}

    out = RESULTS / f"trace_repair_{args.tag}.jsonl"

    def rows() -> dict:
        lines = out.read_text().splitlines() if out.exists() else []
        return {r["method"]: r for r in map(json.loads, lines) if r["model"] == case.label}

    for method in wanted:
        if (case.label, method) in done:
            continue
        if method == "staged":
            started = time.perf_counter()
            stage = staged()
            stage["decision s"] = round(time.perf_counter() - started, 1)
            if stage["picked"] not in rows():
                one_case(case, args, done, write, [stage["picked"]])
            write({**rows()[stage["picked"]], "method": "staged", "stage": stage})
            continue
        if method == "unlearning only" and not trace_flagged and "trace + unlearning" in rows():
            # nothing traced: trace + unlearning was unlearning only, the same repair with the same seed
            write({**rows()["trace + unlearning"], "method": method, "flags from": "none",
                   "same as": "trace + unlearning (nothing traced)"})
            continue
        extra_row, pairs = {}, []
        if method in KEPT_COPIES:
            pairs, reproduced = stamps()
            extra_row = {"stamps": len(pairs), "trace reproduced": reproduced}
            if reproduced is False:     # stamps of another trace than the cut's: not the registered method
                print(f"{case.label}: tracing again gave other channels than the cached trace; no "
                      f"{method} row", file=sys.stderr, flush=True)
                continue
            if not pairs and "trace + unlearning" in rows():
                # no reversed trigger to stamp: the same repair as trace + unlearning, with the same seed
                write({**rows()["trace + unlearning"], "method": method, **extra_row,
                       "same as": "trace + unlearning (no reversed trigger)"})
                continue
        keep, copies = KEPT_COPIES.get(method, "all"), {"kept": 0, "made": 0}
        started = time.perf_counter()
        flagged, settings, source = plans[method]()
        checking = method in (SELF_CHECKED, DISTILLED_CHECKED, UNIVERSAL_CHECKED, UNIVERSAL_REFITTED)
        universal: dict = {}
        with distillation(method in ("trace + distilled unlearning", DISTILLED_CHECKED), loaded, preprocessing), \
                universal_unlearning(method in (UNIVERSAL_CHECKED, UNIVERSAL_REFITTED), loaded, train, preprocessing,
                                     found, args.seed, universal, refit=method == UNIVERSAL_REFITTED), \
                stamp_unlearning(pairs, keep, found["target_class"], copies):
            result = repair(loaded, data, settings, replace(scan_config, selection="trace") if checking else
                            scan_config, flagged=flagged, check=check if checking else None)
        if checking:
            extra_row = {"self-check": self_check_row(result.report.self_check)}
        if universal:
            extra_row["universal"] = universal
        if keep != "all":
            extra_row["feature-map copies kept"] = copies
        if method == RETRACED:
            result, extra_row = retraced(result, flagged)
        if args.keep_models:
            slug = re.sub(r"[^0-9A-Za-z]+", "-", method).strip("-")     # trace + unlearning: trace-unlearning
            kept = folder / f"repaired_{args.tag}_{slug}.onnx"
            partial = kept.with_suffix(".partial")
            onnx.save(result.model, str(partial))
            partial.replace(kept)
        after = measured(result.model)
        m = after.metrics
        seconds = time.perf_counter() - started
        if method.endswith("removal only"):
            extra = {}      # nothing was trained: no re-activation, no verdict after
        elif twin and method == RETRACED:
            extra = {}      # its row holds the verdict on the repaired model already
        elif twin:    # the self-check's question: does the verdict call the repaired model clean?
            checked = result.report.self_check["after"] if checking else \
                verdict_on(loaded, result.model, train, preprocessing, "cpu", check).to_dict()
            extra = {"verdict after": {"verdict": checked["verdict"], "class": checked["target_class"],
                                       "suspicion": checked["suspicion"]}}
        else:
            extra = reactivated(result.model)
        write({"model": case.label, "method": method, "flags from": source,
               "removed": sum(map(len, result.report.flagged.values())), "ACC": round(m.acc, 4),
               "ASR": rounded(m.asr), "RA": rounded(m.ra), "DER": rounded(after.der),
               "holdout ACC": result.report.accuracy, "time s": round(seconds, 1),
               "verdict": {"verdict": found["verdict"], "class": found["target_class"]},
               "trace rounds": len(trace.get("rounds", [])), **extra_row, **extra})


def self_check_row(check: dict) -> dict:
    """What a row keeps of a repair report's self-check: its word, the verdicts, the patch check (0.4.0), the
    stronger try."""
    def brief(verdict: dict | None) -> dict | None:
        return verdict and {"verdict": verdict["verdict"], "class": verdict["target_class"],
                            "suspicion": verdict["suspicion"]}

    def patch(figures: dict | None) -> dict | None:
        return figures and {key: figures[key] for key in ("target", "spot", "success", "best_other", "median_other",
                                                          "leads")}
    escalation = check["escalation"]
    return {"status": check["status"], "before": brief(check["before"]), "after": brief(check["after"]),
            "patch": patch(check.get("patch")),
            "escalation": escalation and {"setting": escalation["setting"], "kept": escalation["kept"],
                                          "after": brief(escalation["after"]), "patch": patch(escalation.get("patch")),
                                          "holdout ACC": escalation["accuracy"]}}


@contextlib.contextmanager
def distillation(on: bool, loaded, preprocessing):
    """Within it (``on``), the repair's fine-tuning takes its clean loss half from the model as given."""
    if not on:
        yield
        return
    import functools
    from unittest import mock

    import fmt_audit.repair.pipeline as pipeline

    teacher = frozen(loaded.classifier, preprocessing)
    with mock.patch.object(pipeline, "fine_tune", functools.partial(pipeline.fine_tune,
                                                                    clean_loss=distilled_from(teacher))):
        yield


@contextlib.contextmanager
def universal_unlearning(on: bool, loaded, train, preprocessing, found: dict, seed: int, figures: dict,
                         refit: bool = False):
    """Within it (``on``, where the verdict named a class), every fine-tuning of the repair that unlearns (the
    repair's and the stronger try's) has, for ``UNIVERSAL_SHARE`` of its images (a seeded coin per image), the
    clean image plus the named class's universal perturbation as its copy (true label), in place of the copy it
    had: fitted once on the model as given, ``UNIVERSAL_IMAGES`` training images of other classes, ``UNIVERSAL_STEPS``
    projected steps, at the verdict ladder's last budget. ``figures``: the budget and its success on as many other
    held-out training images."""
    if not on or found.get("verdict") != "suspicious" or found.get("target_class") is None:
        yield
        return
    from unittest import mock

    import torch

    import fmt_audit.repair.pipeline as pipeline
    from fmt_audit.verdict.evidence.universal import _fit

    target = int(found["target_class"])
    budget = float(found["budgets"][-1])
    given = frozen(loaded.classifier, preprocessing)
    others = np.random.default_rng(seed).permutation(np.flatnonzero(train.y != target))
    fit, held = others[:UNIVERSAL_IMAGES], others[UNIVERSAL_IMAGES:2 * UNIVERSAL_IMAGES]
    x = torch.from_numpy(np.ascontiguousarray(train.x))
    radius = budget * float(np.prod(train.x.shape[1:])) ** 0.5
    started = time.perf_counter()
    delta = _fit(given, x, [fit], [target], torch.zeros((1, *train.x.shape[1:])), radius, UNIVERSAL_STEPS)[0]
    with torch.no_grad():
        reached = float((given((x[held] + delta).clamp(0, 1)).argmax(1) == target).float().mean())
    figures.update({"budget": budget, "success held out": round(reached, 4), "held out": len(held),
                    "fit s": round(time.perf_counter() - started, 1)})

    class Universal:
        def __init__(self, perturbation, student=None, every: int = 0):
            self.perturbation, self.rng = perturbation, np.random.default_rng([seed, 7])
            self.student, self.every, self.calls, self.delta = student, every, 0, delta

        def __call__(self, images):
            if self.student is not None and self.calls % self.every == 0:
                module = self.student.module
                training = module.training
                module.eval()
                start = self.delta[None].to(images.device)
                self.delta = _fit(self.student, x.to(images.device), [fit], [target], start, radius, REFIT_STEPS)[0]
                with torch.no_grad():
                    now = (self.student((x[held].to(images.device) + self.delta).clamp(0, 1)).argmax(1) == target)
                refits.append(round(float(now.float().mean()), 4))
                module.train(training)
            self.calls += 1
            out = self.perturbation(images).clone()
            rows = torch.from_numpy(np.flatnonzero(self.rng.random(len(images)) < UNIVERSAL_SHARE))
            if len(rows):
                out[rows] = (images[rows] + self.delta.to(images.device)).clamp(0, 1)
            return out

    refits: list[float] = []

    def tuned(classifier, train_set, config, *args, perturb=None, fine_tune=pipeline.fine_tune, **kwargs):
        wrapped = None
        if perturb is not None:
            wrapped = Universal(perturb, classifier, config.steps_per_epoch(len(train_set))) if refit else \
                Universal(perturb)
        return fine_tune(classifier, train_set, config, *args, perturb=wrapped, **kwargs)

    with mock.patch.object(pipeline, "fine_tune", tuned):
        yield
    if refit:       # the repair's fine-tuning's re-fits, then the stronger try's where one ran
        figures["success before each re-fit"] = refits


@contextlib.contextmanager
def stamp_unlearning(pairs: list, keep: str = "all", target: int | None = None, copies: dict | None = None):
    """Within it (``pairs`` of reversed-trigger mask and pattern, numpy), the repair's unlearning copies are for
    ``STAMP_SHARE`` of the images (drawn per image, seeded) the clean image with one of the stamps (drawn per
    image), in place of its feature-map perturbation; both are trained with the true label. ``keep``: which
    feature-map copies stay (``all``; ``targeted``: those the model under repair predicts as ``target`` while it
    does not predict it for the clean image; ``none``), the others replaced by their clean image; ``copies``
    counts the feature-map copies made and kept (docs/research/repair-targeted-unlearning.md)."""
    if not pairs:
        yield
        return
    from unittest import mock

    import torch

    import fmt_audit.repair.pipeline as pipeline
    from fmt_audit.verdict.evidence.cleanse import stamped

    masks = torch.from_numpy(np.stack([m for m, _ in pairs]).astype(np.float32))
    patterns = torch.from_numpy(np.stack([p for _, p in pairs]).astype(np.float32))

    class StampOrPerturbation(pipeline.FeatureMapPerturbation):
        def __init__(self, *args, seed: int = 0, **kwargs):
            super().__init__(*args, seed=seed, **kwargs)
            self.stamp_rng = np.random.default_rng([seed, len(pairs)])

        def __call__(self, x):
            out = x.clone() if keep == "none" else super().__call__(x)
            rows = np.flatnonzero(self.stamp_rng.random(len(x)) < STAMP_SHARE)
            if keep != "all":
                unstamped = torch.from_numpy(np.setdiff1d(np.arange(len(x)), rows)).to(x.device)
                kept = torch.zeros(len(x), dtype=torch.bool, device=x.device)
                if keep == "targeted" and len(unstamped):
                    module = self.classifier.module
                    training = module.training
                    module.eval()
                    with torch.no_grad():
                        predicted = self.classifier(torch.cat([x[unstamped], out[unstamped]])).argmax(1)
                    module.train(training)
                    clean, copy = predicted[:len(unstamped)], predicted[len(unstamped):]
                    kept[unstamped] = (copy == target) & (clean != target)
                dropped = ~kept
                out[dropped] = x[dropped]
                copies["made"] += len(unstamped)
                copies["kept"] += int(kept.sum())
            which = torch.from_numpy(self.stamp_rng.integers(0, len(pairs), len(rows)))
            if len(rows):
                index = torch.from_numpy(rows).to(x.device)
                out[index] = stamped(x[index], masks[which].to(x.device), patterns[which].to(x.device))
            return out

    with mock.patch.object(pipeline, "FeatureMapPerturbation", StampOrPerturbation):
        yield


if __name__ == "__main__":
    main()
