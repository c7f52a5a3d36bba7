"""The transfer verdict (issue 8): does the leading class's universal perturbation also move clean reference
networks trained on the scan's images?"""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLES
from fmt_audit_cli.main import main

from fmt_audit.data import Dataset, Preprocessing, load_npz
from fmt_audit.errors import ConfigError, DataError
from fmt_audit.loading import load_model
from fmt_audit.reference import train_reference
from fmt_audit.scan import ScanConfig, scan
from fmt_audit.transfer import transfer_test
from fmt_audit.verdict import TRANSFER_THRESHOLD, ReferenceConfig, UniversalConfig, describe, transfer_verdict

TARGETS = {m["attack"]: m["target"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]
           if m["attack"] != "none"}
DATA = SAMPLES / "defender.npz"
QUICK = UniversalConfig(images=16, steps=8)     # a sliver of the default effort (32 images, 20 steps per rung)
FEW_STEPS = ReferenceConfig(steps=150)          # of the default 400


def test_the_verdict_takes_off_what_the_references_also_do():
    success = [[0.1, 0.2, 0.1, 0.0], [0.95, 0.3, 0.2, 0.1]]
    natural = transfer_verdict([0.01, 0.02], success, [[0.9, 0.1, 0.0, 0.0], [0.8, 0.3, 0.0, 0.0]],
                               [[0.05, 0.0, 0.0, 0.0], [0.05, 0.0, 0.0, 0.0]])
    assert natural.target_class == 0 and natural.suspicion == pytest.approx(0.95 - 0.8) and natural.verdict == "clean"
    backdoor = transfer_verdict([0.01, 0.02], success, [[0.1, 0.9, 0.9, 0.9]], [[0.05, 0.0, 0.0, 0.0]])
    assert backdoor.suspicion == pytest.approx(0.9) and backdoor.verdict == "suspicious"
    assert backdoor.to_dict()["reference_success"] == [[0.1, 0.9, 0.9, 0.9]]
    assert backdoor.to_dict()["budgets"] == [0.01, 0.02]
    clipped = transfer_verdict([0.01], [[0.5, 0.1, 0.1]], [[0.1, 0.0, 0.0]], [[0.9, 0.0, 0.0]])
    assert clipped.suspicion == 0.5        # a perturbation that pulls the references away adds no suspicion
    assert transfer_verdict([0.01], [[1.0, 0.1, 0.1]], [[1 - TRANSFER_THRESHOLD, 0.0, 0.0]],
                            [[0.0, 0.0, 0.0]]).verdict == "suspicious"     # at the cut
    text = describe(natural.to_dict())
    assert "sends 95% of held-out images to class 0; 2 reference networks" in text and "85% (5% without it)" in text
    with pytest.raises(ValueError, match="one row of 4 classes per reference"):
        transfer_verdict([0.01, 0.02], success, [[0.1, 0.2]], [[0.0, 0.0]])
    empty = transfer_verdict([0.01], [[0.5, 0.4]], [[0.0, 0.0]], [[0.0, 0.0]])
    assert empty.verdict == "inconclusive" and empty.method == "transfer" and empty.suspicion is None


def test_reference_config_is_checked():
    for bad in ({"count": 0}, {"steps": 0}, {"batch": 0}, {"lr": 0.0}, {"lr": float("nan")}, {"crop": -1}):
        with pytest.raises(ConfigError):
            ReferenceConfig(**bad)


def test_a_reference_learns_the_scan_images_the_same_way_for_a_seed():
    import torch

    data = load_npz(DATA).take(128, seed=0)
    runs = [train_reference(data, 10, "cpu", FEW_STEPS, seed) for seed in (0, 0, 1)]
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        logits = [r(x).numpy() for r in runs]
    assert np.array_equal(logits[0], logits[1]) and not np.allclose(logits[0], logits[2])
    assert (logits[0].argmax(1) == data.y).mean() > 0.6      # far above the 10% of chance
    with pytest.raises(DataError, match="labels in \\[0, 4\\]"):
        train_reference(data, 5, "cpu", FEW_STEPS)
    with pytest.raises(DataError, match="at least 2 NCHW images"):
        train_reference(Dataset(data.x[:1], data.y[:1]), 10, "cpu", FEW_STEPS)


def test_the_badnets_trigger_does_not_transfer_and_the_clean_models_shortcut_does():
    """On the sample BadNets model the leading class is the target and its perturbation leaves the
    references where they were; the clean sample's leading class is one the references reach as well."""
    data = load_npz(DATA).take(128, seed=0)
    found = {}
    for name in ("clean", "badnets"):
        loaded = load_model(SAMPLES / f"{name}_op13.onnx")
        result, notes = transfer_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu", QUICK,
                                      FEW_STEPS)
        assert notes == [] and len(result.reference_success) == FEW_STEPS.count
        assert result.ladder.perturbations.shape == (10, *data.x.shape[1:])
        assert all(len(h) >= 8 and (data.y[h] != k).all() for k, h in enumerate(result.ladder.held))
        found[name] = transfer_verdict(result.ladder.budgets, result.ladder.success, result.reference_success,
                                       result.reference_baseline)
    badnets, clean = found["badnets"], found["clean"]
    assert badnets.target_class == TARGETS["badnets"] and badnets.verdict == "suspicious"
    assert clean.verdict == "clean" and badnets.suspicion > clean.suspicion + 0.3


def test_scan_and_cli_take_the_transfer_verdict(monkeypatch, tmp_path):
    monkeypatch.setattr(ScanConfig, "universal_config", lambda self: QUICK)
    monkeypatch.setattr(ScanConfig, "reference_config", lambda self: FEW_STEPS)
    report = scan(SAMPLES / "badnets_op13.onnx", DATA, ScanConfig(samples=96, skip_layers="block",
                                                                   verdict="transfer"))
    assert report.verdict["method"] == "transfer" and report.verdict["target_class"] == TARGETS["badnets"]
    assert "reference networks trained on the scan's images" in report.format_text()
    result = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), "--data", str(DATA),
                                       "--samples", "96", "--skip-layers", "block", "--verdict", "transfer",
                                       "--fail-on-suspicious", "--json", str(tmp_path / "r.json"),
                                       "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 1 and "suspicious" in result.output, result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["summary"]["verdict"] == "suspicious" and len(saved["verdict"]["reference_baseline"]) == 3
    page = (tmp_path / "r.html").read_text()
    assert "Transfer test" in page and page.count("data:image/png;base64") >= 3
