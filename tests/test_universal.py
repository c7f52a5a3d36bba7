"""The universal-perturbation verdict (issue 8): a budget ladder of one perturbation per class."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLES
from fmt_audit_cli.main import main

from fmt_audit.data import Dataset, Preprocessing, load_npz
from fmt_audit.errors import ConfigError, DataError
from fmt_audit.fmt.scan import ScanConfig, scan
from fmt_audit.model.loading import load_model
from fmt_audit.verdict import UNIVERSAL_THRESHOLD, UniversalConfig, describe, universal_verdict
from fmt_audit.verdict.evidence.universal import universal_test

TARGETS = {m["attack"]: m["target"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]
           if m["attack"] != "none"}
DATA = SAMPLES / "defender.npz"
QUICK = UniversalConfig(images=16, steps=8)     # a sliver of the default effort (32 images, 20 steps per rung)


def test_the_verdict_reads_the_lead_at_the_last_rung():
    ladder = [[0.1, 0.2, 0.1, 0.0], [0.95, 0.3, 0.2, 0.1]]
    verdict = universal_verdict([0.01, 0.02], ladder)
    assert verdict.target_class == 0 and verdict.suspicion == pytest.approx(0.65) and verdict.verdict == "suspicious"
    assert verdict.to_dict()["budgets"] == [0.01, 0.02]
    close = universal_verdict([0.01], [[0.92, 0.9, 0.7, 0.5]])
    assert close.verdict == "clean" and close.suspicion == pytest.approx(0.02)
    assert universal_verdict([0.01], [[0.95, 0.95 - UNIVERSAL_THRESHOLD, 0.1]]).verdict == "suspicious"   # at the cut
    with pytest.raises(ValueError, match="one budget per rung"):
        universal_verdict([0.01, 0.02], [[0.5, 0.4, 0.1]])
    assert "sends 92% of held-out images to class 0, the next class's 90%" in describe(close.to_dict())
    for bad in ([], [[0.5, 0.4]], [[0.5, np.nan, 0.1]]):
        empty = universal_verdict([0.01] * len(bad), bad)
        assert empty.verdict == "inconclusive" and empty.suspicion is None


def test_universal_config_is_checked():
    for bad in ({"first": 0.0}, {"factor": 1.0}, {"rungs": 0}, {"steps": 0}, {"images": 0}, {"level": 0.0},
                {"level": 1.5}, {"batch": 0}):
        with pytest.raises(ConfigError):
            UniversalConfig(**bad)


def test_the_badnets_target_is_reached_far_ahead_of_the_clean_models_best_class():
    """On the sample BadNets model one faint perturbation sends most images to the target while the other
    classes stay far behind; on the clean sample the best class reached is closely followed."""
    data = load_npz(DATA).take(128, seed=0)
    found = {}
    for name in ("clean", "badnets"):
        loaded = load_model(SAMPLES / f"{name}_op13.onnx")
        ladder, notes = universal_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu", QUICK)
        assert notes == [] and len(ladder.budgets) == len(ladder.success) and len(ladder.success[0]) == 10
        assert ladder.budgets == sorted(ladder.budgets) and ladder.budgets[0] == QUICK.first
        found[name] = universal_verdict(ladder.budgets, ladder.success)
    badnets, clean = found["badnets"], found["clean"]
    assert badnets.target_class == TARGETS["badnets"] and badnets.verdict == "suspicious"
    assert max(badnets.details["success"][-1]) >= QUICK.level         # the ladder stopped where a class took 90%
    assert clean.verdict == "clean" and badnets.suspicion > clean.suspicion + 0.3
    assert badnets.details["budgets"][-1] < clean.details["budgets"][-1]


def test_same_seed_same_ladder_and_a_small_set_is_refused():
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    data = load_npz(DATA).take(64, seed=0)
    config = UniversalConfig(images=8, steps=4, rungs=2)
    runs = [universal_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu", config)[0]
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = universal_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu",
                           UniversalConfig(images=8, steps=4, rungs=2, seed=1))[0]
    assert other.success != runs[0].success          # another seed draws other images to fit and to measure
    few = Dataset(data.x[:12], data.y[:12])
    with pytest.raises(DataError, match="at least 8 held-out images.* held out and [0-9]+ to fit"):
        universal_test(loaded.proto, loaded.image_input, Preprocessing(), few, "cpu", config)


def test_scan_and_cli_take_the_universal_verdict(monkeypatch, tmp_path):
    monkeypatch.setattr(ScanConfig, "universal_config", lambda self: QUICK)
    report = scan(SAMPLES / "badnets_op13.onnx", DATA, ScanConfig(samples=96, skip_layers="block",
                                                                   verdict="universal"))
    assert report.verdict["method"] == "universal" and report.verdict["target_class"] == TARGETS["badnets"]
    assert "one perturbation of RMS" in report.format_text()
    result = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), "--data", str(DATA),
                                       "--samples", "96", "--skip-layers", "block", "--verdict", "universal",
                                       "--fail-on-suspicious", "--json", str(tmp_path / "r.json"),
                                       "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 1 and "suspicious" in result.output, result.output
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["verdict"] == "suspicious"
    page = (tmp_path / "r.html").read_text()
    assert "Universal-perturbation test" in page and page.count("data:image/png;base64") >= 2
    few = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), "--data", str(DATA),
                                    "--samples", "10", "--verdict", "universal", "--skip-layers", "block"])
    assert "inconclusive" in few.output and "held-out" in few.output, few.output
