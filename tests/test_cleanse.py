"""The Neural Cleanse verdict (issue 8): every class's smallest reversed trigger and the anomaly index."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLES
from fmt_audit_cli.main import main

from fmt_audit.data import Dataset, Preprocessing, load_npz
from fmt_audit.errors import ConfigError, DataError
from fmt_audit.fmt.scan import ScanConfig
from fmt_audit.model.loading import load_model
from fmt_audit.verdict import CLEANSE_THRESHOLD, CleanseConfig, anomaly_index, cleanse_verdict, describe
from fmt_audit.verdict.evidence.cleanse import cleanse_test

TARGETS = {m["attack"]: m["target"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]
           if m["attack"] != "none"}
DATA = SAMPLES / "defender.npz"
QUICK = CleanseConfig(steps=100, images=16)     # a third of the default steps on half the images


def test_the_anomaly_index_is_the_smallest_norms_distance_below_the_median_in_robust_deviations():
    norms = [0.01, 0.1, 0.12, 0.09, 0.11]       # median 0.1, median absolute deviation 0.01
    top, index = anomaly_index(norms)
    assert top == 0 and index == pytest.approx(0.09 / (1.4826 * 0.01))
    verdict = cleanse_verdict(norms, [0.9, 0.5, 0.4, 0.6, 0.5], [True] * 5)
    assert verdict.method == "cleanse" and verdict.target_class == 0 and verdict.verdict == "suspicious"
    assert verdict.suspicion == pytest.approx(index / (index + 2), abs=1e-6)
    assert verdict.details["trigger_success"][0] == 0.9 and verdict.details["reached"] == [True] * 5
    text = describe(verdict.to_dict())
    assert "class 0's smallest reversed trigger covers 1.0% of the pixels, the median class's 10.0%" in text
    assert "sends 90% of held-out images there" in text
    ordinary = cleanse_verdict([0.08, 0.1, 0.12, 0.09, 0.11])   # index 0.02 / 0.0148 = 1.35
    assert ordinary.verdict == "clean" and ordinary.suspicion == pytest.approx(1.349 / 3.349, abs=1e-3)
    # Neural Cleanse's threshold, an index of 2, is the suspicion 0.5
    spread = 1.4826 * 0.01
    at_cut = cleanse_verdict([0.1 - 2 * spread, 0.09, 0.1, 0.11, 0.1])
    assert at_cut.suspicion == pytest.approx(CLEANSE_THRESHOLD) and CLEANSE_THRESHOLD == 0.5
    alone = cleanse_verdict([0.01, 0.1, 0.1, 0.1])     # the others all equal: infinitely far
    assert alone.suspicion == 1.0 and alone.details["anomaly_index"] is None
    assert "anomaly index infinite" in describe(alone.to_dict())
    assert cleanse_verdict([0.1, 0.1, 0.1]).suspicion == 0.0


def test_the_cleanse_verdict_is_inconclusive_without_evidence_and_checks_its_figures():
    for norms in ([0.1, 0.2], [0.1, np.nan, 0.2], [0.1, np.inf, 0.2]):
        verdict = cleanse_verdict(norms)
        assert verdict.verdict == "inconclusive" and verdict.suspicion is None and verdict.method == "cleanse"
    none = cleanse_verdict([1.0, 1.0, 1.0], reached=[False] * 3)
    assert none.verdict == "inconclusive" and "no class's trigger reached" in none.basis
    with pytest.raises(ValueError, match="one trigger_success figure per class"):
        cleanse_verdict([0.1, 0.2, 0.3], success=[0.5, 0.5])


def test_cleanse_config_is_checked():
    for bad in ({"steps": 0}, {"images": 0}, {"patience": 0}, {"batch": 0}, {"lr": 0.0}, {"lr": np.nan},
                {"cost": -1.0}, {"level": 0.0}, {"level": 1.5}):
        with pytest.raises(ConfigError):
            CleanseConfig(**bad)


def test_the_badnets_target_needs_a_far_smaller_trigger_found_where_the_patch_is():
    """On the sample BadNets model the target's reversed trigger is far smaller than the other classes'
    and sits in the patch's corner; on the clean sample the smallest class is an ordinary one."""
    data = load_npz(DATA).take(128, seed=0)
    found = {}
    for name in ("clean", "badnets"):
        loaded = load_model(SAMPLES / f"{name}_op13.onnx")
        triggers, notes = cleanse_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu", QUICK)
        assert notes == [] and len(triggers.norms) == 10 and all(triggers.reached)
        assert triggers.masks.shape == (10, 1, 16, 16) and triggers.patterns.shape == (10, 1, 16, 16)
        assert all(0 < n < 1 for n in triggers.norms) and all(0 <= s <= 1 for s in triggers.success)
        found[name] = (triggers, cleanse_verdict(triggers.norms, triggers.success, triggers.reached))
    (bad_triggers, badnets), (clean_triggers, clean) = found["badnets"], found["clean"]
    assert badnets.target_class == TARGETS["badnets"]
    assert badnets.details["anomaly_index"] > clean.details["anomaly_index"] + 0.8
    assert badnets.suspicion > clean.suspicion + 0.1 and clean.verdict == "clean"

    def corner(triggers, k):    # the share of the mask's mass in the patch's corner (rows and columns 12-15)
        mask = triggers.masks[k, 0]
        return float(mask[12:, 12:].sum() / mask.sum())
    assert corner(bad_triggers, badnets.target_class) > 0.25 > 0.1 > corner(clean_triggers, clean.target_class)


def test_same_seed_same_triggers_and_a_small_set_is_refused():
    loaded = load_model(SAMPLES / "blended_op13.onnx")
    data = load_npz(DATA).take(64, seed=0)
    config = CleanseConfig(steps=10, images=8)
    runs = [cleanse_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu", config)[0]
            for _ in range(2)]
    assert runs[0] == runs[1] and np.array_equal(runs[0].masks, runs[1].masks)
    other = cleanse_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu",
                         CleanseConfig(steps=10, images=8, seed=1))[0]
    assert other.norms != runs[0].norms
    few = Dataset(data.x[:12], data.y[:12])
    with pytest.raises(DataError, match="trigger search needs, for every class, at least 8 held-out images"):
        cleanse_test(loaded.proto, loaded.image_input, Preprocessing(), few, "cpu", config)


def test_scan_and_cli_take_the_cleanse_verdict(monkeypatch, tmp_path):
    monkeypatch.setattr(ScanConfig, "cleanse_config", lambda self: QUICK)
    result = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), "--data", str(DATA),
                                       "--samples", "96", "--skip-layers", "block", "--verdict", "cleanse",
                                       "--fail-on-suspicious", "--json", str(tmp_path / "r.json"),
                                       "--html", str(tmp_path / "r.html")])
    verdict = json.loads((tmp_path / "r.json").read_text())["verdict"]
    assert verdict["method"] == "cleanse" and verdict["target_class"] == TARGETS["badnets"]
    assert "smallest reversed trigger" in result.output
    recomputed = cleanse_verdict(verdict["norms"], verdict["trigger_success"], verdict["reached"])
    assert verdict["suspicion"] == recomputed.suspicion and verdict["verdict"] == recomputed.verdict
    assert result.exit_code == (1 if verdict["verdict"] == "suspicious" else 0), result.output
    assert verdict["verdict"] in result.output
    page = (tmp_path / "r.html").read_text()
    assert "Trigger search" in page and page.count("data:image/png;base64") >= 2
    few = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), "--data", str(DATA),
                                    "--samples", "10", "--verdict", "cleanse", "--skip-layers", "block"])
    assert "inconclusive" in few.output and "held-out" in few.output, few.output
