"""``fmt``: feature map testing. The channels a scan flags (run here on the training split, or the caller's scan
report or channels; with ``--selection trace``, the channels that carry the ``combined`` verdict's reversed
trigger, traced without the per-channel test) are removed, and fine-tuning unlearns feature-map perturbations
too (except under the ``paper`` preset: the published repair). Where the self-check says the backdoor may
persist, it is tried once more, stronger."""

from __future__ import annotations

from fmt_audit.errors import ConfigError
from fmt_audit.repair.methods.base import Removal, RepairInputs, RepairMethod


class FeatureMapTesting(RepairMethod):
    name = "fmt"
    summary = "feature map testing, remove, fine-tune"
    takes_channels = True
    escalates = True

    def removal(self, inputs: RepairInputs) -> Removal:
        from fmt_audit.fmt.scan import scan
        from fmt_audit.report.json_report import ScanReport

        loaded, flagged = inputs.loaded, inputs.flagged
        if flagged is None and inputs.scan_config.selection == "trace":
            return _traced(inputs)
        if flagged is None:
            report = scan(loaded, inputs.train, inputs.scan_config, progress=inputs.progress, verdict=None,
                          references=inputs.references)
            return Removal("scan", report.flagged, scan=report)
        if isinstance(flagged, ScanReport):
            if flagged.model.get("sha256") != loaded.sha256:
                made_for = str(flagged.model.get("sha256"))[:12]
                raise ConfigError(f"the scan report was made for another model (sha256 {made_for}..., "
                                  f"this model {loaded.sha256[:12]}...)")
            scanned_output = flagged.model.get("class_output", loaded.scores)    # reports before 0.4 name none
            if scanned_output != loaded.scores:
                raise ConfigError(f"the scan report read the class scores from output {scanned_output!r}, this "
                                  f"repair from {loaded.scores!r}: give --class-output {scanned_output}")
            return Removal("report", flagged.flagged)
        return Removal("given", flagged)

    def unlearns(self, config, scan_config) -> bool:
        return config.unlearn if config.unlearn is not None else scan_config.preset != "paper"


def _traced(inputs: RepairInputs) -> Removal:
    """``--selection trace`` without the per-channel test (its scores would decide nothing here): the
    ``combined`` verdict on the training split, then the trace of the class it names (none where it names
    none), as ``scan --selection trace`` finds them; the verdict, the trace, their settings and times are
    the removal's evidence."""
    import logging
    import time
    from dataclasses import asdict

    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.fmt.scan import scanned_layers
    from fmt_audit.fmt.trace import require_combined, trace_verdict
    from fmt_audit.verdict import VerdictConfig, VerdictInputs, gather

    log = logging.getLogger(__name__)
    loaded, config, device = inputs.loaded, inputs.scan_config, inputs.classifier.device
    check = inputs.check or VerdictConfig(seed=config.seed)
    require_combined(check)
    layers = scanned_layers(loaded, config)
    started = time.perf_counter()
    # a conversion of its own: the verdict and the trace freeze what they differentiate, the repair tunes its own
    bridge = to_torch(loaded.classifier)
    log.info("trace: the %s verdict on %d of %d training images", check.method, min(check.samples, len(inputs.train)),
             len(inputs.train))
    if inputs.progress:
        inputs.progress(f"{check.method} verdict", 0, 0)
    found = gather(VerdictInputs(loaded, inputs.train.take(check.samples, seed=check.seed), config.preprocessing,
                                 device, bridge, inputs.references, inputs.progress), check)
    verdict_s = time.perf_counter() - started
    log.info("trace: %s; tracing", found.verdict)
    if inputs.progress:
        inputs.progress("trace", 0, 0)
    trace = trace_verdict(BridgedClassifier(bridge, config.preprocessing, device), layers, inputs.train, found,
                          config.seed, with_stamps=True)
    traced, stamps = trace.pop("layers", {}), tuple(trace.pop("stamps", ()))
    channels = {layer.name: traced[layer.name] for layer in layers if layer.name in traced}   # the model's order
    settings = {"selection": config.selection, "skip_layers": config.skip_layers, "seed": config.seed,
                "verdict": asdict(check)}
    return Removal("trace", channels, evidence={
        "verdict": found.to_dict(), "trace": trace, "settings": settings,
        "timing": {"verdict_s": round(verdict_s, 3), "trace_s": round(time.perf_counter() - started - verdict_s, 3)}},
        stamps=stamps)


FMT = FeatureMapTesting()
