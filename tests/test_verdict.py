"""The verdict registry, its settings, and the fast data-free method (``margin``, MM-BD's maximum-margin test)."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import QUICK_MARGIN, QUICK_VERDICT, SAMPLES, save
from fmt_audit_cli.main import main
from onnx import helper

from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
from fmt_audit.backends.torch.logits import without_final_softmax
from fmt_audit.data import Preprocessing
from fmt_audit.errors import ConfigError
from fmt_audit.fmt.scan import ScanConfig, scan
from fmt_audit.model.loading import load_model
from fmt_audit.verdict import CHOICES, DEFAULT, METHODS, NO_VERDICT, VerdictConfig, assess, describe, figures
from fmt_audit.verdict.config import MarginConfig
from fmt_audit.verdict.evidence.margins import margin_test, max_margins
from fmt_audit.verdict.margin import MARGIN, margin_verdict

TARGETS = {m["attack"]: m["target"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]
           if m["attack"] != "none"}
DATA = SAMPLES / "defender.npz"


def test_the_registry_lists_the_shipped_methods_default_first():
    assert list(METHODS) == ["combined", "margin"] and DEFAULT == "combined"
    assert CHOICES == ("combined", "margin", NO_VERDICT)
    for name, method in METHODS.items():
        assert method.name == name and 0 < method.threshold <= 1 and method.summary
    assert METHODS["margin"].needs_data is False and METHODS["combined"].needs_data is True


def test_verdict_config_is_checked_once_with_what_was_expected():
    assert VerdictConfig().method == DEFAULT and VerdictConfig.from_options("none") is None
    assert VerdictConfig.from_options("margin", 64, 3).samples == 64
    with pytest.raises(ConfigError, match="--verdict must be one of combined, margin, none; got 'vote'"):
        VerdictConfig(method="vote")
    with pytest.raises(ConfigError, match="--verdict-samples must be at least 1; got 0"):
        VerdictConfig(samples=0)
    with pytest.raises(ConfigError, match="--margin-steps"):
        VerdictConfig(margin_steps=0)
    for bad in ({"restarts": 0}, {"steps": 0}, {"lr": 0.0}, {"batch": 0}):
        with pytest.raises(ConfigError):
            MarginConfig(**bad)


def test_margin_verdict_names_the_class_that_stands_out():
    standing_out = margin_verdict([10.0, 11.0, 9.0, 10.5, 50.0, 9.5, 10.2, 11.3, 9.8, 10.7])
    assert standing_out.verdict == "suspicious" and standing_out.target_class == 4
    assert standing_out.suspicion >= MARGIN.threshold and standing_out.details["p_value"] < 0.05
    alike = margin_verdict([10.0, 11.0, 9.0, 10.5, 11.9, 9.5, 10.2, 11.3, 9.8, 10.7])
    assert alike.verdict == "clean" and alike.target_class == 4 and alike.suspicion < MARGIN.threshold
    # a larger outlier is less likely under the other classes' distribution
    p_value = {top: margin_verdict([10, 11, 9, 10.5, top, 9.5]).details["p_value"] for top in (20, 40)}
    assert 0 < p_value[40] < p_value[20] < 0.05
    text = describe(standing_out.to_dict())
    assert text.startswith("verdict: suspicious (suspicion") and "class 4 reaches margin 50" in text
    assert [f.title for f in figures(standing_out.to_dict())] == ["Maximum-margin test"]


@pytest.mark.parametrize(("margins", "why"), [
    ([5.0, 60.0], "at least 3 classes"),
    ([3.0, np.nan, 4.0], "finite margins"),
    ([-1.0, -2.0, -0.5], "no class reached a positive margin"),
])
def test_margin_verdict_without_evidence_is_inconclusive(margins, why):
    verdict = margin_verdict(margins)
    assert verdict.verdict == "inconclusive" and verdict.suspicion is None and why in verdict.basis
    assert describe(verdict.to_dict()).startswith("verdict: inconclusive") and figures(verdict.to_dict()) == []


def test_margin_verdict_takes_unreached_and_equal_classes():
    # classes no start pushed above the others (margin <= 0) count as a sliver of the largest
    assert margin_verdict([-3.0, 1.0, 1.2, 0.9, 30.0]).verdict == "suspicious"
    assert margin_verdict([2.0, 2.0, 2.0, 9.0]).details["p_value"] == 0.0       # no Gamma fits equal values
    assert margin_verdict([2.0, 2.0, 2.0, 2.0]).verdict == "clean"


def test_a_report_naming_a_retired_method_is_still_described():
    old = {"method": "sink", "suspicion": 0.9, "verdict": "suspicious", "target_class": 0, "threshold": 0.5,
           "basis": "sink concentration"}
    assert describe(old) == "verdict: suspicious (suspicion 0.90, threshold 0.5: sink concentration)"
    assert figures(old) == []


def test_the_badnets_target_reaches_a_margin_no_other_class_does():
    """The sample BadNets model's target (class 0) stands out by orders of magnitude in p. (The clean sample
    has a class that stands out too: the test's false positive, README "The verdict".)"""
    config = VerdictConfig(method="margin", samples=16)
    verdicts = {name: assess(SAMPLES / f"{name}_op13.onnx", config=config).to_dict() for name in ("clean", "badnets")}
    badnets, clean = verdicts["badnets"], verdicts["clean"]
    assert badnets["method"] == "margin" and badnets["verdict"] == "suspicious"
    assert badnets["target_class"] == TARGETS["badnets"] and badnets["p_value"] < 1e-6
    assert clean["p_value"] > 1000 * badnets["p_value"]
    margins = badnets["margins"]
    assert len(margins) == 10 and margins[0] > 3 * sorted(margins)[-2]


def test_the_scan_carries_the_verdict_it_is_given_and_none_when_told():
    config = ScanConfig(samples=16, skip_layers="block")
    report = scan(SAMPLES / "badnets_op13.onnx", DATA, config, verdict=QUICK_VERDICT)
    assert report.verdict["method"] == "margin" and report.timing["verdict_s"] > 0
    assert "class 0 reaches margin" in report.format_text()
    assert report.config["verdict"]["method"] == "margin"
    bare = scan(SAMPLES / "badnets_op13.onnx", DATA, config, verdict=None)
    assert bare.verdict is None and bare.config["verdict"] is None
    assert [layer.flagged for layer in bare.layers] == [layer.flagged for layer in report.layers]


def test_margins_do_not_depend_on_the_batch():
    loaded = load_model(SAMPLES / "clean_op13.onnx")
    classifier = BridgedClassifier(to_torch(loaded.proto), Preprocessing())
    together = max_margins(classifier, (1, 16, 16), 10, MarginConfig(restarts=2, steps=10, batch=256))
    apart = max_margins(classifier, (1, 16, 16), 10, MarginConfig(restarts=2, steps=10, batch=2))
    np.testing.assert_allclose(together, apart, rtol=1e-4)


def _with_softmax(model: onnx.ModelProto, hidden: bool) -> onnx.ModelProto:
    """The model with its logits turned into probabilities (and, when ``hidden``, an Identity after the
    Softmax, so that no graph rule finds it)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    logits = out.graph.output[0].name
    out.graph.node.append(helper.make_node("Softmax", [logits], ["probabilities"], name="softmax", axis=1))
    last = "probabilities"
    if hidden:
        out.graph.node.append(helper.make_node("Identity", ["probabilities"], ["scores"], name="identity"))
        last = "scores"
    out.graph.output[0].name = last
    onnx.checker.check_model(out)
    return out


def test_a_final_softmax_is_removed_and_a_hidden_one_undone(tmp_path):
    loaded = load_model(SAMPLES / "clean_op13.onnx")
    config = MarginConfig(restarts=2, steps=10)
    plain, notes = margin_test(loaded.proto, loaded.image_input, Preprocessing(), "cpu", config)
    assert notes == []
    for hidden in (False, True):
        path = save(_with_softmax(loaded.proto, hidden), tmp_path / f"softmax_{hidden}.onnx")
        probabilities = load_model(path)
        stripped, found = without_final_softmax(probabilities.proto)
        assert found is not hidden
        if found:
            assert stripped.graph.output[0].name == loaded.proto.graph.output[0].name
            assert len(probabilities.proto.graph.node) == len(stripped.graph.node) + 1   # the input is not changed
        margins, notes = margin_test(probabilities.proto, probabilities.image_input, Preprocessing(), "cpu", config)
        assert bool(notes) is found
        # log-probabilities differ from the logits by one constant per image: the same margins
        np.testing.assert_allclose(margins, plain, rtol=1e-3)


def test_without_a_verdict_the_gate_falls_back_to_any_channel_flagged():
    data = ["--data", str(DATA), "--fail-on-suspicious", "--samples", "64"]
    no_verdict = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), *data, "--verdict", "none"])
    assert no_verdict.exit_code == 1 and "channel(s) flagged" in no_verdict.output
    bad = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), *data, "--margin-restarts", "0"])
    assert bad.exit_code == 2 and "--margin-restarts must be at least 1" in bad.output
    assert bad.output.count("\n") == 1


def test_the_margin_verdict_drives_the_gate(tmp_path):
    codes = {}
    for attack in ("clean", "badnets"):
        report = tmp_path / f"{attack}.json"
        result = CliRunner().invoke(main, ["scan", str(SAMPLES / f"{attack}_op13.onnx"), "--data", str(DATA),
                                           "--samples", "16", "--skip-layers", "block", "--verdict", "margin",
                                           "--margin-steps", "50",
                                           "--fail-on-suspicious", "--json", str(report)])
        verdict = json.loads(report.read_text())["verdict"]
        codes[attack] = (result.exit_code, verdict["verdict"])
        assert result.exit_code == (1 if verdict["verdict"] != "clean" else 0), result.output
    assert codes["badnets"] == (1, "suspicious")


def test_a_model_the_bridge_cannot_convert_keeps_its_scan_and_gets_an_inconclusive_verdict(monkeypatch):
    import fmt_audit.backends.torch.bridge
    import fmt_audit.backends.torch.logits
    from fmt_audit.errors import BridgeError

    def refuse(model):
        raise BridgeError("onnx2torch cannot convert op 'Fancy'")

    # wherever it is asked: the scan's one conversion for its verdict, and the verdict's own
    monkeypatch.setattr(fmt_audit.backends.torch.bridge, "to_torch", refuse)
    monkeypatch.setattr(fmt_audit.backends.torch.logits, "to_torch", refuse)
    report = scan(SAMPLES / "clean_op13.onnx", DATA, ScanConfig(samples=8, skip_layers="block"),
                  verdict=VerdictConfig(method="margin", **QUICK_MARGIN))
    assert report.verdict["verdict"] == "inconclusive" and "cannot convert op 'Fancy'" in report.verdict["basis"]
    assert report.layers and report.attention().startswith("inconclusive")
