"""--selection trace (issue 31): the channels that carry the verdict's reversed trigger, cut round by round."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import QUICK_VERDICT, SAMPLES, quick_combined

from fmt_audit.errors import ConfigError
from fmt_audit.fmt.scan import ScanConfig, scan
from fmt_audit.report.json_report import ScanReport

DATA = SAMPLES / "defender.npz"
MANIFEST = json.loads((SAMPLES / "manifest.json").read_text())
TARGET = next(m["target"] for m in MANIFEST["models"] if m["attack"] == "badnets")


def _asr(model_path, removed) -> float:
    from fmt_audit.backends.onnxrt.masked import MaskedModel
    from fmt_audit.data import load_npz
    from fmt_audit.model.loading import load_model

    masked = MaskedModel(load_model(model_path).proto, "cpu")
    clean, triggered = load_npz(SAMPLES / "test.npz"), load_npz(SAMPLES / "badnets_test.npz").x
    return float((masked.predict(triggered[clean.y != TARGET], removed) == TARGET).mean())


def test_trace_flags_channels_that_carry_the_backdoor(monkeypatch, tmp_path):
    quick_combined(monkeypatch)
    model = SAMPLES / "badnets_op13.onnx"
    report = scan(model, DATA, ScanConfig(selection="trace", samples=32))
    assert report.verdict["verdict"] == "suspicious" and report.verdict["target_class"] == TARGET
    trace = report.trace
    assert trace["target"] == TARGET and trace["flagged"] == report.flagged_count > 0
    assert trace["rounds"][0]["success_before"] > trace["rounds"][0]["success_after"]
    assert report.flagged_count <= 0.1 * sum(layer.channels for layer in report.layers)
    # removing them cuts the real trigger's success far below as many random channels per layer
    rng = np.random.default_rng(0)
    random = {layer.name: rng.choice(layer.channels, len(layer.flagged), replace=False).tolist()
              for layer in report.layers if layer.flagged}
    assert _asr(model, report.flagged) < _asr(model, random) - 0.3, (report.flagged, trace)
    assert "trace: " in report.format_text() and "reversed trigger" in report.format_text()
    # the report keeps the rounds, and reads back
    (tmp_path / "r.json").write_text(report.to_json())
    assert ScanReport.read(tmp_path / "r.json").trace == trace


@pytest.mark.slow
def test_trace_flags_nothing_where_the_verdict_finds_no_backdoor(monkeypatch):
    quick_combined(monkeypatch)
    report = scan(SAMPLES / "clean_op13.onnx", DATA, ScanConfig(selection="trace", samples=32))
    assert report.verdict["verdict"] == "clean"
    assert report.flagged_count == 0 and report.trace == {"skipped": "the verdict is not suspicious"}
    assert "trace: nothing flagged (the verdict is not suspicious)" in report.format_text()


@pytest.mark.parametrize("verdict", [None, QUICK_VERDICT])
def test_trace_needs_the_combined_verdict(verdict):
    with pytest.raises(ConfigError, match="--selection trace follows the combined verdict"):
        scan(SAMPLES / "badnets_op13.onnx", DATA, ScanConfig(selection="trace", samples=8), verdict=verdict)


def _trace_repair(**kwargs):
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig
    from fmt_audit.repair.pipeline import repair

    return repair(SAMPLES / "badnets_op13.onnx", DATA, RepairConfig(FineTuneConfig(epochs=1)),
                  ScanConfig(selection="trace", samples=32), **kwargs)


def test_a_trace_repair_needs_the_combined_verdict():
    with pytest.raises(ConfigError, match="--selection trace follows the combined verdict"):
        _trace_repair(check=QUICK_VERDICT)


def test_a_trace_repair_removes_nothing_where_the_verdict_names_no_class(monkeypatch):
    """The verdict and the trace decide, not a per-channel test: a clean verdict (stubbed here; the real one
    on the sample is in test_selfcheck) removes nothing, and the reports say why."""
    import fmt_audit.fmt.scan
    import fmt_audit.verdict
    from fmt_audit.report.html_report import repair_html
    from fmt_audit.verdict.base import Verdict

    seen = []

    def clean(inputs, config):
        seen.append((len(inputs.dataset), config.method))
        return Verdict("combined", 0.1, "clean", 3, 0.5, "stub")

    def no_channel_test(*args, **kwargs):
        raise AssertionError("the per-channel test ran")

    monkeypatch.setattr(fmt_audit.verdict, "gather", clean)
    monkeypatch.setattr(fmt_audit.fmt.scan, "score_layers", no_channel_test)
    result = _trace_repair()
    report = result.report
    assert seen == [(180, "combined")]      # the training split's 180 of the sample's 200 images
    assert result.scan is None and report.source == "trace" and report.flagged_count == 0
    assert report.evidence["trace"] == {"skipped": "the verdict is not suspicious"}
    assert report.evidence["verdict"]["verdict"] == "clean" and report.evidence["settings"]["selection"] == "trace"
    assert set(report.evidence["timing"]) == {"verdict_s", "trace_s"}
    assert "trace: nothing flagged (the verdict is not suspicious)" in report.format_text()
    page = repair_html(report)
    assert "The verdict the channels were traced from" in page and "nothing flagged" in page
