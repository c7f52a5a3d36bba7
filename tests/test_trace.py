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


class PerChannelTest(Exception):
    """Raised where the per-channel test would run (``per_channel_test_refused``)."""


@pytest.fixture
def per_channel_test_refused(monkeypatch):
    """The per-channel test raises :class:`PerChannelTest`; every verdict is a stubbed ``clean`` (so a trace
    flags nothing): which selection ran, and nothing slow."""
    import fmt_audit.fmt.scan
    import fmt_audit.repair.selfcheck
    import fmt_audit.verdict
    from fmt_audit.verdict.base import Verdict

    def per_channel_test(*args, **kwargs):
        raise PerChannelTest

    def clean(inputs, config):
        return Verdict(config.method, 0.1, "clean", 3, 0.5, "stub")

    monkeypatch.setattr(fmt_audit.fmt.scan, "score_layers", per_channel_test)
    monkeypatch.setattr(fmt_audit.verdict, "gather", clean)
    monkeypatch.setattr(fmt_audit.repair.selfcheck, "gather", clean)


@pytest.mark.parametrize("check", ["combined", "margin", None])
def test_the_default_repair_traces_where_it_checks_itself_with_the_combined_verdict(per_channel_test_refused, check):
    """``auto``, the default selection: a repair that chooses its own channels and checks itself with the
    ``combined`` verdict traces them (no per-channel test); with another verdict, or none, it runs the
    per-channel outlier test as before."""
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig
    from fmt_audit.repair.pipeline import repair
    from fmt_audit.verdict import VerdictConfig

    assert ScanConfig().selection == "auto"
    verdict = None if check is None else VerdictConfig(method=check)
    run = lambda: repair(SAMPLES / "badnets_op13.onnx", DATA, RepairConfig(FineTuneConfig(epochs=0)),  # noqa: E731
                         ScanConfig(samples=32), check=verdict)
    if check == "combined":
        report = run().report
        assert report.source == "trace" and report.evidence["settings"]["selection"] == "trace"
        assert report.self_check["status"] == "not found"
    else:
        with pytest.raises(PerChannelTest):
            run()


@pytest.mark.parametrize("verdict", ["combined", "margin", None])
def test_the_default_scan_flags_the_trace_where_the_combined_verdict_runs(monkeypatch, verdict):
    """``auto`` in a scan: with the ``combined`` verdict (the default) its flags are the trace's (stubbed clean
    here: nothing traced, nothing flagged, and the per-channel test's scores still reported); with another
    verdict, or none, the per-channel outlier test flags."""
    import fmt_audit.fmt.scan
    from fmt_audit.verdict import VerdictConfig
    from fmt_audit.verdict.base import Verdict

    monkeypatch.setattr(fmt_audit.fmt.scan, "gather_verdict",
                        lambda inputs, config: Verdict(config.method, 0.1, "clean", 3, 0.5, "stub"))
    config = None if verdict is None else VerdictConfig(method=verdict)
    report = scan(SAMPLES / "badnets_op13.onnx", DATA, ScanConfig(samples=8), verdict=config)
    assert report.config["selection"] == ("trace" if verdict == "combined" else "outlier")
    assert all(layer.scores for layer in report.layers)     # the per-channel test ran either way
    if verdict == "combined":
        assert report.flagged_count == 0 and report.trace == {"skipped": "the verdict is not suspicious"}
    else:
        assert report.trace is None


def test_compare_repairs_with_fmt_as_repair_does_by_default(per_channel_test_refused):
    """``compare``'s ``fmt`` is the default repair: the ``combined`` verdict's class traced (stubbed clean here:
    nothing removed), no per-channel test; ``--preset gradient`` keeps its per-channel test."""
    from fmt_audit.repair.comparison import compare
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig

    common = (SAMPLES / "badnets_op13.onnx", DATA, SAMPLES / "test.npz")
    comparison = compare(*common, methods=["fmt"], config=RepairConfig(FineTuneConfig(epochs=0)))
    (outcome,) = comparison.outcomes
    assert outcome.error is None and outcome.repair.source == "trace" and outcome.repair.flagged_count == 0
    assert outcome.repair.self_check is None
    with pytest.raises(PerChannelTest):
        compare(*common, methods=["fmt"], config=RepairConfig(FineTuneConfig(epochs=0)),
                scan_config=ScanConfig.from_preset("gradient", samples=8))


def test_stamp_or_perturbation_stamps_a_seeded_half_of_the_copies():
    """Half the unlearning copies (a seeded coin per image) are the clean image with one of the trace's reversed
    triggers stamped in, the others the perturbation's copy. The draws are the measured method's
    (docs/research/repair-stamp-unlearning.md): every image perturbed first, then a coin per image, then a stamp
    per stamped image, from ``default_rng([seed, stamps])``."""
    import torch

    from fmt_audit.repair.finetune import STAMP_SHARE, StampOrPerturbation

    x = torch.rand(2000, 3, 8, 8)
    masks = [torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)]
    masks[0][:, :2, :2], masks[1][:, -2:, -2:] = 1.0, 1.0
    stamps = [(masks[0], torch.zeros(3, 8, 8)), (masks[1], torch.ones(3, 8, 8))]
    perturbed_batches = []

    def perturbation(images: torch.Tensor) -> torch.Tensor:
        perturbed_batches.append(len(images))
        return images + 5.0

    out = StampOrPerturbation(perturbation, stamps, seed=3)(x)
    rng = np.random.default_rng([3, 2])
    rows = np.flatnonzero(rng.random(len(x)) < STAMP_SHARE)
    which = rng.integers(0, 2, len(rows))
    expected = x + 5.0
    for row, k in zip(rows, which):
        expected[row] = (1 - masks[k]) * x[row] + masks[k] * stamps[k][1]
    assert perturbed_batches == [len(x)] and torch.equal(out, expected)
    assert abs(len(rows) / len(x) - STAMP_SHARE) < 0.05 and 0.4 < which.mean() < 0.6     # both stamps drawn
    # a perturbation that hands back its input is not stamped over
    same = torch.rand(4, 3, 8, 8)
    kept = same.clone()
    StampOrPerturbation(lambda images: images, stamps, share=1.0)(same)
    assert torch.equal(same, kept)
    with pytest.raises(ValueError, match="at least one reversed trigger"):
        StampOrPerturbation(lambda images: images, [])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        StampOrPerturbation(lambda images: images, stamps, share=1.5)


@pytest.mark.parametrize("on", [True, False])
def test_a_trace_repair_unlearns_with_the_traces_reversed_triggers(monkeypatch, on):
    """The reversed triggers the trace found reach the unlearning (half the copies stamped with them) and the
    report says so; ``unlearn_stamps=False`` keeps the feature-map perturbations alone. The verdict and the
    trace are stubbed here (a real trace repair: test_selfcheck)."""
    import torch

    import fmt_audit.fmt.trace
    import fmt_audit.repair.pipeline
    import fmt_audit.verdict
    from fmt_audit.fmt.gradient import FeatureMapPerturbation
    from fmt_audit.model.loading import load_model
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig
    from fmt_audit.repair.finetune import StampOrPerturbation
    from fmt_audit.repair.pipeline import repair
    from fmt_audit.verdict.base import Verdict

    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    layer = loaded.layers[0].name
    channels, height, width = loaded.image_input.channels, loaded.image_input.height, loaded.image_input.width
    mask = torch.zeros(1, height, width)
    mask[:, -3:, -3:] = 1.0
    stamp = (mask, torch.ones(channels, height, width))
    monkeypatch.setattr(fmt_audit.verdict, "gather",
                        lambda inputs, config: Verdict("combined", 0.8, "suspicious", TARGET, 0.5, "stub",
                                                       {"norms": [0.01] * loaded.num_classes}))

    def traced(classifier, layers, dataset, verdict, seed=0, with_stamps=False):
        found = {"target": TARGET, "flagged": 1, "rounds": [], "stop": "stub", "layers": {layer: [0]}}
        return {**found, "stamps": [stamp]} if with_stamps else found

    monkeypatch.setattr(fmt_audit.fmt.trace, "trace_verdict", traced)
    seeds = []

    class Seeded(StampOrPerturbation):
        def __init__(self, *args, seed: int = 0, **kwargs):
            seeds.append(seed)
            super().__init__(*args, seed=seed, **kwargs)

    monkeypatch.setattr(fmt_audit.repair.pipeline, "StampOrPerturbation", Seeded)
    used = []
    fine_tune = fmt_audit.repair.pipeline.fine_tune
    monkeypatch.setattr(fmt_audit.repair.pipeline, "fine_tune",
                        lambda *a, perturb=None, **k: used.append(perturb) or fine_tune(*a, perturb=perturb, **k))
    config = RepairConfig(FineTuneConfig(epochs=1, seed=3), unlearn_eps=0.1, unlearn_stamps=on)
    report = repair(loaded, DATA, config, ScanConfig(selection="trace", samples=32)).report
    assert report.flagged == {layer: [0]} and len(used) == 1
    unlearning = report.config["unlearning"]
    if on:      # the trace's own stamp, drawn with the fine-tuning's seed
        assert isinstance(used[0], StampOrPerturbation) and isinstance(used[0].perturbation, FeatureMapPerturbation)
        assert torch.equal(used[0].masks[0], mask) and torch.equal(used[0].patterns[0], stamp[1])
        assert seeds == [3]
        assert unlearning["stamps"] == 1 and unlearning["stamp_share"] == 0.5
        assert "(50% of the copies) on the trace's 1 reversed trigger" in report.format_text()
    else:
        assert isinstance(used[0], FeatureMapPerturbation)
        assert unlearning["stamps"] == 0 and "stamp_share" not in unlearning
        assert "reversed trigger" not in report.format_text().split("unlearning")[1].split("\n")[0]


@pytest.mark.parametrize("decided_by", ["warp", None])
def test_the_trace_follows_the_trigger_that_decided(monkeypatch, decided_by):
    """Where the warp search decided, the warp is traced, at the budget where its class led and against the
    other classes' best share there; elsewhere the reversed stamp, against the other classes' median mask."""
    import fmt_audit.fmt.trace as trace_module
    from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
    from fmt_audit.data import Preprocessing, load_npz
    from fmt_audit.model.loading import load_model
    from fmt_audit.verdict.base import Verdict

    calls = []
    monkeypatch.setattr(trace_module, "trace_warp", lambda *args, **kw: calls.append(("warp", *args[3:6])) or
                        trace_module.Trace(2, {"c": [1]}, [], "stub", by="warp"))
    monkeypatch.setattr(trace_module, "trace_channels", lambda *args, **kw: calls.append(("stamp", *args[3:5])) or
                        trace_module.Trace(2, {"c": [0]}, [], "stub"))
    details = {"norms": [0.05, 0.04, 0.001, 0.06], "warp_budgets": [0.5, 1.0],
               "warp_success": [[0.1, 0.2, 0.9, 0.05], [0.3, 0.4, 0.95, 0.2]],   # leads 0.7 and 0.55: budget 0.5
               **({"decided_by": decided_by} if decided_by else {})}
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    classifier = BridgedClassifier(to_torch(loaded.proto), Preprocessing(), "cpu")
    found = trace_module.trace_verdict(classifier, loaded.layers, load_npz(DATA),
                                       Verdict("combined", 0.8, "suspicious", 2, 0.5, "stub", details))
    if decided_by == "warp":
        assert calls == [("warp", 2, 0.5, 0.2)] and found["trigger"] == "warp" and found["layers"] == {"c": [1]}
    else:
        assert calls == [("stamp", 2, 0.05)] and found["trigger"] == "stamp" and found["layers"] == {"c": [0]}
