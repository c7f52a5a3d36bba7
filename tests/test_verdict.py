"""The model-level verdict (issue 8): the maximum-margin test (default) and the sink concentration."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import QUICK_MARGIN, SAMPLES, save
from fmt_audit_cli.main import main
from onnx import helper

from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
from fmt_audit.backends.torch.logits import without_final_softmax
from fmt_audit.data import Preprocessing
from fmt_audit.errors import ConfigError
from fmt_audit.fmt.scan import ScanConfig, scan
from fmt_audit.model.loading import load_model
from fmt_audit.verdict import MARGIN_THRESHOLD, MarginConfig, describe, margin_verdict
from fmt_audit.verdict.margin import margin_test, max_margins

TARGETS = {m["attack"]: m["target"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]
           if m["attack"] != "none"}
DATA = SAMPLES / "defender.npz"


def test_margin_verdict_names_the_class_that_stands_out():
    standing_out = margin_verdict([10.0, 11.0, 9.0, 10.5, 50.0, 9.5, 10.2, 11.3, 9.8, 10.7])
    assert standing_out.verdict == "suspicious" and standing_out.target_class == 4
    assert standing_out.suspicion >= MARGIN_THRESHOLD and standing_out.details["p_value"] < 0.05
    alike = margin_verdict([10.0, 11.0, 9.0, 10.5, 11.9, 9.5, 10.2, 11.3, 9.8, 10.7])
    assert alike.verdict == "clean" and alike.target_class == 4 and alike.suspicion < MARGIN_THRESHOLD
    # a larger outlier is less likely under the other classes' distribution
    p_value = {top: margin_verdict([10, 11, 9, 10.5, top, 9.5]).details["p_value"] for top in (20, 40)}
    assert 0 < p_value[40] < p_value[20] < 0.05


@pytest.mark.parametrize(("margins", "why"), [
    ([5.0, 60.0], "at least 3 classes"),
    ([3.0, np.nan, 4.0], "finite margins"),
    ([-1.0, -2.0, -0.5], "no class reached a positive margin"),
])
def test_margin_verdict_without_evidence_is_inconclusive(margins, why):
    verdict = margin_verdict(margins)
    assert verdict.verdict == "inconclusive" and verdict.suspicion is None and why in verdict.basis
    assert describe(verdict.to_dict()).startswith("verdict: inconclusive")


def test_margin_verdict_takes_unreached_and_equal_classes():
    # classes no start pushed above the others (margin <= 0) count as a sliver of the largest
    assert margin_verdict([-3.0, 1.0, 1.2, 0.9, 30.0]).verdict == "suspicious"
    assert margin_verdict([2.0, 2.0, 2.0, 9.0]).details["p_value"] == 0.0       # no Gamma fits equal values
    assert margin_verdict([2.0, 2.0, 2.0, 2.0]).verdict == "clean"


def test_margin_config_is_checked():
    for bad in ({"restarts": 0}, {"steps": 0}, {"lr": 0.0}, {"batch": 0}):
        with pytest.raises(ConfigError):
            MarginConfig(**bad)
    with pytest.raises(ConfigError, match="--margin-steps"):
        ScanConfig(margin_steps=0)
    with pytest.raises(ConfigError, match="--verdict must be"):
        ScanConfig(verdict="vote")


def test_the_badnets_target_reaches_a_margin_no_other_class_does():
    """The sample BadNets model's target (class 0) stands out by orders of magnitude in p. (The clean sample
    has a class that stands out too, at p 0.002: the test's false positive, README "The verdict".)"""
    config = ScanConfig(samples=16, skip_layers="block")
    reports = {name: scan(SAMPLES / f"{name}_op13.onnx", DATA, config) for name in ("clean", "badnets")}
    badnets, clean = reports["badnets"].verdict, reports["clean"].verdict
    assert badnets["method"] == "margin" and badnets["verdict"] == "suspicious"
    assert badnets["target_class"] == TARGETS["badnets"] and badnets["p_value"] < 1e-6
    assert clean["p_value"] > 1000 * badnets["p_value"]
    margins = badnets["margins"]
    assert len(margins) == 10 and margins[0] > 3 * sorted(margins)[-2]
    text = reports["badnets"].format_text()
    assert "verdict: suspicious" in text and "class 0 reaches margin" in text
    assert reports["badnets"].timing["verdict_s"] > 0


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


@pytest.mark.parametrize("preset", ["default", "gradient"])
def test_sink_verdict_names_the_attack_target_passes_the_clean_model_and_drives_the_gate(preset, tmp_path):
    verdicts = {}
    attacks = ("badnets", "blended") if preset == "default" else ("badnets",)     # blended once: time
    for attack in ("clean", *attacks):
        report = tmp_path / f"{attack}.json"
        result = CliRunner().invoke(main, ["scan", str(SAMPLES / f"{attack}_op13.onnx"), "--data", str(DATA),
                                           "--samples", "64", "--preset", preset, "--verdict", "sink",
                                           "--fail-on-suspicious", "--json", str(report)])
        verdicts[attack] = json.loads(report.read_text())["verdict"]
        assert result.exit_code == (0 if attack == "clean" else 1), result.output     # the gate follows the verdict
        assert ("verdict: clean" if attack == "clean" else "suspicious: suspicion") in result.output
    assert verdicts["clean"]["verdict"] == "clean" and verdicts["clean"]["method"] == "sink"
    for attack in attacks:
        assert verdicts[attack]["verdict"] == "suspicious" and verdicts[attack]["target_class"] == TARGETS[attack]
        assert verdicts[attack]["suspicion"] > verdicts["clean"]["suspicion"] + 0.3


def test_a_model_the_bridge_cannot_convert_keeps_its_scan_and_gets_an_inconclusive_verdict(monkeypatch):
    import fmt_audit.backends.torch.logits
    from fmt_audit.errors import BridgeError

    def refuse(model):
        raise BridgeError("onnx2torch cannot convert op 'Fancy'")

    monkeypatch.setattr(fmt_audit.backends.torch.logits, "to_torch", refuse)
    report = scan(SAMPLES / "clean_op13.onnx", DATA, ScanConfig(samples=8, skip_layers="block", **QUICK_MARGIN))
    assert report.verdict["verdict"] == "inconclusive" and "cannot convert op 'Fancy'" in report.verdict["basis"]
    assert report.layers and report.attention().startswith("inconclusive")
