"""``compare``: every repair method on one model, side by side (ACC, ASR, RA, DER).

Each method asked for (of :data:`fmt_audit.repair.methods.registry.METHODS`; by default
:data:`~fmt_audit.repair.methods.registry.COMPARED`, every one but the slow ``anp``) repairs the same model with the
same clean data, fine-tuning recipe and seed; each repaired graph is measured as
deployed (ONNX Runtime) on the same test images, against the model before any
defense. A method that cannot run on this model (a one-line library error) gets
its error in the table and the others go on.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import onnx

from fmt_audit.data import Dataset, load_data
from fmt_audit.errors import ConfigError, FmtAuditError, first_line
from fmt_audit.fmt.scan import ScanConfig
from fmt_audit.fmt.selection import resolve_selection
from fmt_audit.model.graph import classifier_graph
from fmt_audit.model.loading import LoadedModel, load_model
from fmt_audit.repair.config import RepairConfig
from fmt_audit.repair.evaluation import Metrics, defense_effectiveness, model_metrics
from fmt_audit.repair.methods.registry import COMPARED, METHODS
from fmt_audit.repair.pipeline import repair
from fmt_audit.report.json_report import RepairReport
from fmt_audit.report.schema import SCHEMA_VERSION


@dataclass
class MethodOutcome:
    """One method's result: its repaired model's metrics, or the error that stopped it."""

    method: str
    metrics: Metrics | None
    der: float | None
    removed: int | None
    seconds: float
    error: str | None = None
    repair: RepairReport | None = None
    model: onnx.ModelProto | None = field(default=None, repr=False)   # the repaired graph (not in the JSON)

    def to_dict(self) -> dict:
        return {"method": self.method, "metrics": self.metrics.to_dict() if self.metrics else None,
                "der": None if self.der is None else round(self.der, 6), "removed": self.removed,
                "seconds": round(self.seconds, 3), "error": self.error,
                "repair": self.repair.to_dict() if self.repair else None}


@dataclass
class Comparison:
    model: dict
    baseline: Metrics
    outcomes: list[MethodOutcome]
    config: dict

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "comparison",
                "model": self.model, "baseline": self.baseline.to_dict(), "config": self.config,
                "methods": [outcome.to_dict() for outcome in self.outcomes]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def format_text(self) -> str:
        def pct(value):
            return "-" if value is None else f"{100 * value:.2f}%"

        lines = [f"{'method':10s} {'ACC':>8s} {'ASR':>8s} {'RA':>8s} {'DER':>7s} {'removed':>8s} {'time':>8s}"]
        b = self.baseline
        lines.append(f"{'none':10s} {pct(b.acc):>8s} {pct(b.asr):>8s} {pct(b.ra):>8s} {'':>7s} {'':>8s} {'':>8s}")
        for o in self.outcomes:
            if o.error:
                lines.append(f"{o.method:10s} failed: {o.error}")
                continue
            m = o.metrics
            der = "-" if o.der is None else f"{o.der:.4f}"
            lines.append(f"{o.method:10s} {pct(m.acc):>8s} {pct(m.asr):>8s} {pct(m.ra):>8s} {der:>7s} "
                         f"{o.removed:>8d} {o.seconds:>7.1f}s")
        lines.append(f"{b.clean_images} clean test images" + (
            f", {b.attack_images} triggered images not of target {self.config['target']}" if b.asr is not None else ""))
        return "\n".join(lines)


def compare(model: str | os.PathLike | LoadedModel, data: str | os.PathLike | Dataset,
            test: str | os.PathLike | Dataset, poisoned: str | os.PathLike | Dataset | None = None,
            target: int | None = None, methods: Sequence[str] = COMPARED, config: RepairConfig | None = None,
            scan_config: ScanConfig | None = None,
            on_method: Callable[[str], None] | None = None) -> Comparison:
    """Repair ``model`` with each of ``methods`` on the clean ``data`` and measure each result on ``test``
    (and, with ``poisoned`` and ``target``, the attack). ``on_method(name)`` is called as each starts.

    ``fmt`` is the default repair: its channels (selection ``auto``) are the trace of the ``combined`` verdict's
    class, found at the verdict's defaults; no self-check runs (compare measures with the attack instead)."""
    config = config or RepairConfig()
    scan_config = scan_config or ScanConfig()
    scan_config = replace(scan_config, selection=resolve_selection(scan_config.selection, traceable=True))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods takes a comma-separated list of {', '.join(METHODS)}; got "
                          f"{', '.join(methods) or 'none'}")
    methods = list(dict.fromkeys(methods))     # each once, in the order given
    if (poisoned is None) != (target is None):
        raise ConfigError("--poisoned and --target go together: give both or neither")
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    classes = loaded.num_classes
    if target is not None and (target < 0 or (classes is not None and target >= classes)):
        raise ConfigError(f"--target must be a class of the model (0..{(classes or 1) - 1}); got {target}")

    def load(source):
        return source if isinstance(source, Dataset) else load_data(source, loaded.image_input, classes)

    clean, test_set = load(data), load(test)
    triggered = load(poisoned) if poisoned is not None else None
    preprocessing = scan_config.preprocessing
    baseline, provider = model_metrics(loaded.classifier, test_set, triggered, target, preprocessing,
                                       scan_config.device)
    outcomes = []
    for method in methods:
        if on_method:
            on_method(method)
        started = time.perf_counter()
        try:
            result = repair(loaded, clean, replace(config, method=method), scan_config)
        except FmtAuditError as error:
            outcomes.append(MethodOutcome(method, None, None, None, time.perf_counter() - started, first_line(error)))
            continue
        seconds = time.perf_counter() - started
        metrics, _ = model_metrics(classifier_graph(result.model, loaded.scores), test_set, triggered, target,
                                   preprocessing, scan_config.device)
        der = defense_effectiveness(baseline, metrics) if triggered is not None else None
        outcomes.append(MethodOutcome(method, metrics, der, result.report.flagged_count, seconds,
                                      repair=result.report, model=result.model))
    return Comparison(
        model={"path": str(loaded.path), "sha256": loaded.sha256}, baseline=baseline, outcomes=outcomes,
        config={"target": target, "methods": methods, "ort_provider": provider,
                "data": clean.source, "test": test_set.source, "poisoned": triggered.source if triggered else None,
                "seed": scan_config.seed, "preset": scan_config.preset, **preprocessing.to_dict()})
