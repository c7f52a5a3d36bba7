"""Scan and repair reports: the JSON documents (schema: :mod:`fmt_audit.report.schema`,
docs/report-schema.md) and the short text summaries."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fmt_audit.errors import DataError, first_line
from fmt_audit.report.schema import SCHEMA_VERSION


@dataclass
class LayerResult:
    name: str
    channels: int
    depthwise: bool
    scores: list[list[float]]       # accuracy on each of the channel's candidate batches (layout per mode)
    shift: list[list[float]]        # class shift on each candidate batch (see fmt_audit.fmt.scores)
    flagged: list[int]
    selection: dict
    sink: list[list[int]] = field(default_factory=list)   # the class each shift went to (-1: none)
    feature_map: list[int] | None = None    # [height, width] of the layer's output, if known

    def to_dict(self) -> dict:
        return {"name": self.name, "channels": self.channels, "depthwise": self.depthwise,
                "feature_map": self.feature_map,
                "scores": self.scores, "shift": self.shift, "sink": self.sink, "flagged": self.flagged,
                "selection": self.selection}


def attention(verdict: str | None, suspicion: float | None, flagged: int | None) -> str | None:
    """Why a scanned model needs a closer look, or None. The verdict decides (anything but ``clean``);
    a scan without one (``--verdict none``) needs it when any channel was flagged."""
    if verdict is None:
        return f"suspicious: {flagged} channel(s) flagged" if flagged else None
    if verdict == "clean":
        return None
    return (f"{verdict}: suspicion {suspicion}" if suspicion is not None
            else "inconclusive: no evidence for a verdict (the report says why)")


@dataclass
class ScanReport:
    model: dict
    config: dict
    layers: list[LayerResult]
    clean_accuracy: float
    skipped_layers: list[str] = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)   # memory plan and peaks: machine-dependent, like timing
    verdict: dict | None = None     # model-level suspicion and verdict (fmt_audit.verdict); None: not computed
    trace: dict | None = None       # --selection trace: its rounds (fmt_audit.fmt.trace); None: another selection

    @property
    def flagged(self) -> dict[str, list[int]]:
        """Flagged channel indices per layer (layers with none left out)."""
        return {layer.name: list(layer.flagged) for layer in self.layers if layer.flagged}

    @property
    def flagged_count(self) -> int:
        return sum(len(layer.flagged) for layer in self.layers)

    @property
    def summary(self) -> dict:
        tested = sum(layer.channels for layer in self.layers)
        return {
            "layers_tested": len(self.layers), "channels_tested": tested, "flagged": self.flagged_count,
            "flagged_fraction": round(self.flagged_count / tested, 6) if tested else 0.0,
            "degenerate_layers": [layer.name for layer in self.layers if layer.selection.get("degenerate")],
            "skipped_layers": self.skipped_layers, "clean_accuracy": round(self.clean_accuracy, 6),
            "suspicion": (self.verdict or {}).get("suspicion"), "verdict": (self.verdict or {}).get("verdict"),
        }

    def attention(self) -> str | None:
        """Why this model needs a closer look (``--fail-on-suspicious``; a fleet's ``--repair suspicious``),
        or None: see :func:`attention`."""
        verdict = self.verdict or {}
        return attention(verdict.get("verdict"), verdict.get("suspicion"), self.flagged_count)

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "scan",
                "model": self.model, "config": self.config, "layers": [layer.to_dict() for layer in self.layers],
                "summary": self.summary, "verdict": self.verdict, "trace": self.trace, "timing": self.timing,
                "resources": self.resources}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, saved: dict, where: str = "scan report") -> ScanReport:
        """A report back from :meth:`to_dict`'s JSON (checked: it may come from anywhere)."""
        def table(rows) -> list[list[float]]:   # [[score per candidate batch] per channel]
            return [[float(v) for v in row] for row in rows]

        version = saved.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION or saved.get("kind", "scan") != "scan":
            raise DataError(f"{where} is not an fmt-audit scan report of schema version {SCHEMA_VERSION} or earlier "
                            f"(kind {saved.get('kind', 'scan')!r}, schema_version {version!r}): written by a newer "
                            "fmt-audit, or another report")
        try:
            layers = [LayerResult(str(e["name"]), int(e["channels"]), bool(e["depthwise"]), table(e["scores"]),
                                  table(e["shift"]), [int(c) for c in e["flagged"]], dict(e["selection"]),
                                  [[int(v) for v in row] for row in e.get("sink", [])],
                                  [int(v) for v in e["feature_map"]] if e.get("feature_map") else None)
                      for e in saved["layers"]]
            summary = saved["summary"]
            report = cls(dict(saved["model"]), dict(saved["config"]), layers, float(summary["clean_accuracy"]),
                         list(summary.get("skipped_layers", [])), dict(saved.get("timing", {})),
                         dict(saved.get("resources", {})),
                         None if saved.get("verdict") is None else dict(saved["verdict"]),
                         None if saved.get("trace") is None else dict(saved["trace"]))
            str(report.model["sha256"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DataError(f"{where} is not an fmt-audit scan report: missing or malformed "
                            f"{error.args[0] if isinstance(error, KeyError) else 'field'} "
                            f"({type(error).__name__})") from error
        return report

    @classmethod
    def read(cls, path: str | os.PathLike) -> ScanReport:
        """Read a report written by ``fmt-audit scan -o``."""
        path = Path(path)
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"cannot read the scan report {path}: {first_line(error)}") from error
        if not isinstance(saved, dict):
            raise DataError(f"{path} is not an fmt-audit scan report: expected a JSON object")
        return cls.from_dict(saved, str(path))

    def format_text(self) -> str:
        s = self.summary
        c = self.config
        column = "accuracy" if c["score"] == "accuracy" else "class shift"
        lines = [f"{'layer':40s} {'channels':>8s} {'flagged':>8s}  median/worst {column}"]
        for layer in self.layers:
            # a channel's worst candidate batch: lowest accuracy or largest shift
            values = [min(row) for row in layer.scores] if c["score"] == "accuracy" else [max(r) for r in layer.shift]
            ordered = sorted(values, reverse=c["score"] != "accuracy")
            note = "  (all scores equal)" if layer.selection.get("degenerate") else ""
            lines.append(f"{layer.name:40s} {layer.channels:8d} {len(layer.flagged):8d}  "
                         f"{ordered[len(ordered) // 2]:.3f}/{ordered[0]:.3f}{note}")
        how = (f"eps {c['eps']}, {c['steps']} step(s)" if c["mode"] == "gradient" else f"gain {c['gain']}")
        lines.append(f"{s['flagged']} of {s['channels_tested']} channels flagged in {s['layers_tested']} layers "
                     f"(preset {c['preset']}: {c['mode']} mode, {how}, {c['score']} scores, "
                     f"{c['selection']} selection); clean accuracy {s['clean_accuracy']:.4f} on {c['samples']} images")
        if s["degenerate_layers"]:
            lines.append(f"warning: in {len(s['degenerate_layers'])} layer(s) every channel scored the same; "
                         "the test moved no prediction there (try a larger --eps, or --eps auto)")
        if self.verdict:
            from fmt_audit.verdict import describe

            lines.append(describe(self.verdict))
        if self.trace:
            lines.append(format_trace(self.trace))
        broken = self.model.get("nonfinite_weights")
        if broken:
            lines.append(f"warning: NaN or Inf in {len(broken)} weight tensor(s) ({', '.join(broken[:3])}); "
                         "the scores above come from a broken model")
        return "\n".join(lines)


@dataclass
class RepairReport:
    """What a repair removed, how fine-tuning went, and how the result was verified."""

    model: dict
    config: dict
    flagged: dict[str, list[int]]
    source: str                     # where the removed channels came from (fmt_audit.repair.methods: Removal.source)
    channels_total: int
    data: dict
    accuracy: dict                  # holdout accuracy: before, after_removal, after (None without a holdout)
    epochs: list[dict]
    verification: dict
    regrowth: dict | None = None
    warnings: list[str] = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    output: dict | None = None      # path and sha256 of the written model, filled in by whoever writes it
    method: str = "fmt"             # a name of fmt_audit.repair.methods.registry.METHODS
    evidence: dict | None = None    # what the method chose the channels on (fp, clp, anp) or its own step's (ibau)
    self_check: dict | None = None  # the verdict before and after (fmt_audit.repair.selfcheck); None: not run

    @property
    def flagged_count(self) -> int:
        return sum(len(channels) for channels in self.flagged.values())

    def record_output(self, path: str | os.PathLike, sha256: str) -> None:
        """Note where the repaired model was written, and its sha256."""
        self.output = {"path": str(path), "sha256": sha256}

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "repair",
                "model": self.model, "output": self.output, "method": self.method, "config": self.config,
                "flagged": {"source": self.source, "count": self.flagged_count, "channels_total": self.channels_total,
                            "layers": self.flagged, "evidence": self.evidence},
                "data": self.data, "accuracy": self.accuracy, "epochs": self.epochs,
                "verification": self.verification, "self_check": self.self_check, "regrowth": self.regrowth,
                "warnings": self.warnings, "timing": self.timing}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def format_text(self) -> str:
        def fmt(value):
            return "-" if value is None else f"{value:.4f}"

        c, a, v = self.config, self.accuracy, self.verification
        lines = [f"method       {self.method}",
                 f"removed      {self.flagged_count} of {self.channels_total} channels in {len(self.flagged)} layers "
                 f"(from {self.source})"]
        lines += [f"  {name}: {', '.join(map(str, channels))}" for name, channels in self.flagged.items()]
        if self.source == "trace" and self.evidence and self.evidence.get("trace"):
            lines.append(f"  {format_trace(self.evidence['trace'])}")
        if c["epochs"]:
            lines.append(f"fine-tuned   {c['epochs']} epochs, {c['steps']} steps, batch {c['batch_size_used']}, "
                         f"lr {c['lr']} -> {c['final_lr']}, augment {'on' if c['augment'] else 'off'}, "
                         f"flip {'on' if c['flip_decision']['flip'] else 'off'}"
                         f"{', channels free to regrow' if c['allow_regrowth'] else ''}")
        else:
            from fmt_audit.repair.methods.registry import METHODS

            known = METHODS.get(self.method)
            why = known.without_fine_tuning if known is not None else ""
            lines.append("fine-tuned   no" + (f" ({why})" if why else ""))
        unlearning = c.get("unlearning") or {}
        if unlearning.get("eps") is not None:
            stamps = unlearning.get("stamps")
            lines.append(f"unlearning   on feature-map perturbations, eps {unlearning['eps']} "
                         f"({unlearning['eps_from']}), {unlearning['steps']} steps"
                         + (f", and ({unlearning['stamp_share']:.0%} of the copies) on the trace's {stamps} "
                            f"reversed trigger{'s' if stamps > 1 else ''}" if stamps else ""))
        if self.data["holdout"]:
            lines.append(f"holdout      {self.data['holdout']} images: accuracy {fmt(a['before'])} before, "
                         f"{fmt(a['after_removal'])} after removal, {fmt(a['after'])} after fine-tuning")
        else:
            lines.append("holdout      none: accuracy not measured")
        lines.append(f"verified     ONNX checker passed; ONNX Runtime ({v['ort_provider']}) matches torch "
                     f"(max |logit difference| {v['max_abs_logit_difference']:.2g})"
                     f"{'; removed channels exactly zero' if v['removed_exactly_zero'] else ''}")
        if self.self_check:
            lines.append(format_self_check(self.self_check))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def format_self_check(check: dict) -> str:
    """The summary lines of a self-check as reports store it."""
    def said(verdict: dict | None) -> str:
        if verdict is None:
            return "not computed"
        if verdict.get("suspicion") is None:
            return f"inconclusive ({verdict['basis']})"
        named = f", class {verdict['target_class']}" if verdict["verdict"] == "suspicious" else ""
        return f"{verdict['verdict']} (suspicion {verdict['suspicion']:.2f}{named})"

    def patch_said(patch: dict) -> str:
        compared = ("" if patch["best_other"] is None else
                    f" (other classes at most {patch['best_other']:.1%}, median {patch['median_other']:.1%})")
        return (f"a {patch['size']}x{patch['size']} patch sends {patch['success']:.1%} into class {patch['target']}"
                f"{compared}: {'leads' if patch['leads'] else 'does not lead'}")

    lines = [f"self-check   {check['status']}: {check['after']['method']} verdict on the repaired model "
             f"{said(check['after'])}; on the model as given {said(check['before'])}"]
    if check.get("patch"):
        lines.append(f"             {patch_said(check['patch'])}")
    escalation = check.get("escalation")
    if escalation:
        patch = f"; {patch_said(escalation['patch'])}" if escalation.get("patch") else ""
        lines.append(f"             tried {escalation['setting']}: {said(escalation['after'])}{patch}"
                     f"{' (kept)' if escalation['kept'] else ' (not kept: no better)'}")
    return "\n".join(lines)


def format_trace(trace: dict) -> str:
    """The summary line of ``--selection trace`` as reports store it."""
    if "skipped" in trace:
        return f"trace: nothing flagged ({trace['skipped']})"
    cuts = ", ".join(f"{r['added']}" for r in trace["rounds"] if "added" in r)
    trigger = "smooth warp" if trace.get("trigger") == "warp" else "reversed trigger"
    return (f"trace: {trace['flagged']} channels carry class {trace['target']}'s {trigger}, cut in "
            f"{len([r for r in trace['rounds'] if 'added' in r])} round(s) ({cuts}); stopped: {trace['stop']}")
