"""The transfer verdict (issue 8): does the leading class's universal perturbation also move clean reference
networks trained on the scan's images?"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLES
from fmt_audit_cli.main import main

from fmt_audit.verdict.evidence import transfer
from fmt_audit.data import Dataset, Preprocessing, load_npz
from fmt_audit.errors import ConfigError, DataError
from fmt_audit.fmt.scan import ScanConfig, scan
from fmt_audit.model.loading import load_model
from fmt_audit.verdict import (
    SHORTCUT_THRESHOLD,
    TRANSFER_THRESHOLD,
    UNIVERSAL_THRESHOLD,
    UNTRANSFERRED_THRESHOLD,
    ReferenceConfig,
    UniversalConfig,
    describe,
    margin_verdict,
    shortcut_verdict,
    transfer_verdict,
    transferred,
    untransferred_margins,
    untransferred_verdict,
)
from fmt_audit.verdict.evidence.reference import train_reference
from fmt_audit.verdict.evidence.transfer import trained_references, transfer_test

TARGETS = {m["attack"]: m["target"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]
           if m["attack"] != "none"}
DATA = SAMPLES / "defender.npz"
QUICK = UniversalConfig(images=16, steps=8)     # a sliver of the default effort (32 images, 20 steps per rung)
FEW_STEPS = ReferenceConfig(steps=150)          # of the default 400


MARGINS = [40.0, 10.0, 12.0, 11.0]      # class 0 stands far out: p tiny, 1 - p about 1


def test_the_margin_verdict_is_discounted_by_what_the_references_also_do():
    success = [[0.1, 0.2, 0.1, 0.0], [0.95, 0.3, 0.2, 0.1]]
    plain = margin_verdict(MARGINS)
    natural = transfer_verdict(MARGINS, [0.01, 0.02], success, [[0.9, 0.1, 0.0, 0.0], [0.8, 0.3, 0.0, 0.0]],
                               [[0.05, 0.0, 0.0, 0.0], [0.05, 0.0, 0.0, 0.0]])
    assert natural.target_class == plain.target_class == 0 and natural.method == "transfer"
    assert natural.suspicion == pytest.approx(plain.suspicion * (1 - 0.8), abs=1e-6) and natural.verdict == "clean"
    assert natural.details["p_value"] == plain.details["p_value"]
    assert natural.details["transferred"] == pytest.approx([0.8, 0.2, 0.0, 0.0])
    backdoor = transfer_verdict(MARGINS, [0.01, 0.02], success, [[0.0, 0.9, 0.9, 0.9]], [[0.0, 0.0, 0.0, 0.0]])
    assert backdoor.suspicion == plain.suspicion and backdoor.verdict == "suspicious"   # others' transfer: no change
    assert backdoor.to_dict()["reference_success"] == [[0.0, 0.9, 0.9, 0.9]]
    assert backdoor.to_dict()["budgets"] == [0.01, 0.02]
    pulled = transfer_verdict(MARGINS, [0.01], success[-1:], [[0.1, 0.0, 0.0, 0.0]], [[0.9, 0.0, 0.0, 0.0]])
    assert pulled.suspicion == plain.suspicion      # a perturbation that pulls the references away adds nothing
    edge = transfer_verdict(MARGINS, [0.01], success[-1:], [[0.01, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]])
    assert (edge.suspicion >= TRANSFER_THRESHOLD) == (plain.suspicion * 0.99 >= TRANSFER_THRESHOLD)
    text = describe(natural.to_dict())
    assert "class 0 reaches margin 40" in text and "moves 80% of held-out images into it in 2 reference" in text
    with pytest.raises(ValueError, match="one row of 4 classes per reference"):
        transfer_verdict(MARGINS, [0.01, 0.02], success, [[0.1, 0.2]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="one budget per rung"):
        transfer_verdict(MARGINS, [0.01], success, [[0.0] * 4], [[0.0] * 4])
    empty = transfer_verdict([1.0, 2.0], [0.01], [[0.5, 0.4]], [[0.0, 0.0]], [[0.0, 0.0]])
    assert empty.verdict == "inconclusive" and empty.method == "transfer" and empty.suspicion is None
    endless = transfer_verdict(MARGINS, [0.01, 0.02], success, [[float("inf")] * 4], [[0.0] * 4])
    assert endless.verdict == "inconclusive" and "not finite" in endless.basis


def test_the_shortcut_verdict_reads_every_class_beyond_what_the_references_do():
    budgets, success = [0.01, 0.02], [[0.1, 0.2, 0.1, 0.0, 0.0], [0.95, 0.6, 0.2, 0.1, 0.0]]
    held_out = [6.0, 5.0, -1.0, -2.0, -3.0]      # class 0 a little ahead of class 1 in the model
    still = [[-5.0] * 5, [-4.0] * 5]              # the references, per reference and class, without the perturbations
    # class 0's perturbation moves the references by 5 on average (natural), class 1's by 0: class 1 stands out
    moved = [[-1.0, -5.0, -4.0, -5.0, -5.0], [0.0, -4.0, -3.0, -4.0, -4.0]]
    beyond = untransferred_margins(held_out, moved, still)
    assert beyond == pytest.approx([2.0, 5.0, -2.0, -2.0, -3.0])
    verdict = shortcut_verdict(budgets, success, held_out, moved, still)
    # (5 - 2) / (5 - median -2): the lead over the next class, relative to the distance from the middle class
    assert verdict.method == "shortcut" and verdict.target_class == 1
    assert verdict.suspicion == pytest.approx(3 / 7, abs=1e-6) and verdict.verdict == "clean" < "suspicious"
    assert verdict.details["untransferred_margin"] == pytest.approx(beyond.tolist())
    alone = shortcut_verdict(budgets, success, [9.0, -1.0, -1.0, -2.0, -2.0], still, still)
    assert alone.target_class == 0 and alone.suspicion == 1.0 and alone.verdict == "suspicious"
    assert alone.to_dict()["reference_margin_baseline"] == still and alone.to_dict()["budgets"] == budgets
    pulled = shortcut_verdict(budgets, success, [2.0, 1.0, 0.0, 0.0, 0.0], [[-9.0, -4.0, -4.0, -4.0, -4.0]],
                              [[-4.0] * 5])
    assert pulled.target_class == 0 and pulled.suspicion >= SHORTCUT_THRESHOLD   # pushed from clean networks: more
    tied = shortcut_verdict(budgets, success, [3.0, 3.0, 0.0, 0.0, 0.0], still, still)
    assert tied.suspicion == 0.0 and tied.verdict == "clean"
    flat = shortcut_verdict(budgets, success, [1.0] * 5, still, still)
    assert flat.suspicion == 0.0
    text = describe(verdict.to_dict())
    assert "class 1's perturbation (RMS 0.02) gives held-out images a median margin of 5" in text
    assert "beyond what it adds in 2 reference networks" in text and "the next class 2" in text
    with pytest.raises(ValueError, match="one row of 5 classes per reference"):
        untransferred_margins(held_out, [[0.0, 0.0]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="one budget per rung"):
        shortcut_verdict([0.01], success, held_out, moved, still)
    few = shortcut_verdict(budgets, [[0.5, 0.4]] * 2, [1.0, 2.0], [[0.0, 0.0]], [[0.0, 0.0]])
    assert few.verdict == "inconclusive" and few.method == "shortcut" and few.suspicion is None
    broken = shortcut_verdict(budgets, success, [1.0, float("nan"), 0.0, 0.0, 0.0], still, still)
    assert broken.verdict == "inconclusive"


def test_the_untransferred_verdict_reads_the_lead_of_what_the_references_do_not_share():
    budgets, success = [0.01, 0.02], [[0.1, 0.2, 0.1, 0.0, 0.0], [0.95, 0.6, 0.2, 0.1, 0.0]]
    # class 0's perturbation moves 70% of the references' held-out images into it (natural), class 1's 5%
    moved, still = [[0.8, 0.1, 0.0, 0.1, 0.0], [0.6, 0.0, 0.1, 0.0, 0.0]], [[0.0] * 5, [0.0, 0.0, 0.1, 0.0, 0.0]]
    verdict = untransferred_verdict(budgets, success, moved, still)
    assert verdict.method == "untransferred" and verdict.target_class == 1
    assert verdict.details["untransferred"] == pytest.approx([0.25, 0.55, 0.2, 0.05, 0.0])
    assert verdict.suspicion == pytest.approx(0.3) and verdict.verdict == "suspicious"
    assert verdict.threshold == UNTRANSFERRED_THRESHOLD == UNIVERSAL_THRESHOLD
    # nothing transfers: the universal lead; a class the references shed counts as its own share, no more
    alone = untransferred_verdict(budgets, success, still, still)
    assert alone.target_class == 0 and alone.suspicion == pytest.approx(0.35)
    pulled = untransferred_verdict(budgets, success, [[0.0, 0.0, 0.0, 0.0, 0.0]], [[0.0, 0.5, 0.0, 0.0, 0.0]])
    assert pulled.details["untransferred"][1] == pytest.approx(0.6) and pulled.target_class == 0
    close = untransferred_verdict([0.01], [[0.9, 0.8, 0.1, 0.0, 0.0]], still, still)
    assert close.verdict == "clean" and close.suspicion == pytest.approx(0.1)
    text = describe(verdict.to_dict())
    assert "class 1's perturbation (RMS 0.02) sends 60% of held-out images to it, 55% beyond" in text
    assert "in 2 reference networks" in text and "the next class 25%" in text
    with pytest.raises(ValueError, match="one row of 5 classes per reference"):
        untransferred_verdict(budgets, success, [[0.0, 0.0]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="one budget per rung"):
        untransferred_verdict([0.01], success, moved, still)
    few = untransferred_verdict(budgets, [[0.5, 0.4]] * 2, [[0.0, 0.0]], [[0.0, 0.0]])
    assert few.verdict == "inconclusive" and few.method == "untransferred" and few.suspicion is None
    for bad in (float("nan"), float("inf")):      # not clipped into a share
        broken = untransferred_verdict(budgets, success, [[0.0, bad, 0.0, 0.0, 0.0]], [[0.0] * 5])
        assert broken.verdict == "inconclusive" and "not finite" in broken.basis


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


def test_references_are_trained_once_per_images_and_recipe(monkeypatch):
    """A fleet on one data file trains the references once; other images or another recipe train anew."""
    data = load_npz(DATA).take(64, seed=0)
    recipe = ReferenceConfig(count=2, steps=10)
    trained = []
    monkeypatch.setattr(transfer, "_TRAINED", {})
    monkeypatch.setattr(transfer, "train_reference", lambda *a: trained.append(a) or train_reference(*a))
    first = trained_references(data, 10, "cpu", recipe, 0)
    again = trained_references(Dataset(data.x.copy(), data.y.copy()), 10, "cpu", recipe, 0)    # equal, not same
    assert again is first and len(first) == 2 and len(trained) == 2
    relabelled = Dataset(data.x, (data.y + 1) % 10)
    for other in ((relabelled, recipe, 0), (data, ReferenceConfig(count=2, steps=11), 0), (data, recipe, 1)):
        assert trained_references(other[0], 10, "cpu", other[1], other[2]) is not first
    assert len(trained) == 8 and len(transfer._TRAINED) == 4
    trained_references(data.take(32, seed=1), 10, "cpu", recipe, 0)
    assert len(transfer._TRAINED) == 4 and trained_references(data, 10, "cpu", recipe, 0) is not first  # dropped
    fresh, x = train_reference(data, 10, "cpu", recipe, 1), torch.from_numpy(data.x)
    with torch.no_grad():     # a kept network is the one a fresh training gives
        assert torch.equal(first[1](x), fresh(x))


def test_the_badnets_targets_perturbation_does_not_move_the_references():
    """On the sample BadNets model the ladder stops at the target, and the target's perturbation moves the
    model's held-out images into it but leaves the references where they were."""
    data = load_npz(DATA).take(128, seed=0)
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    result, notes = transfer_test(loaded.proto, loaded.image_input, Preprocessing(), data, "cpu", QUICK, FEW_STEPS)
    ladder, target = result.ladder, TARGETS["badnets"]
    assert notes == [] and len(result.reference_success) == len(result.reference_baseline) == FEW_STEPS.count
    assert ladder.perturbations.shape == (10, *data.x.shape[1:])
    assert all(len(h) >= 8 and (data.y[h] != k).all() for k, h in enumerate(ladder.held))
    assert int(np.argmax(ladder.success[-1])) == target and ladder.success[-1][target] >= QUICK.level
    moved = transferred(result.reference_success, result.reference_baseline, 10)
    assert moved[target] < 0.1
    # the median margins: the target's perturbation puts its held-out images in it, in the model only
    figures = result.margin_figures
    assert len(figures["held_out_margin"]) == 10 and np.argmax(figures["held_out_margin"]) == target
    assert figures["held_out_margin"][target] > 0 > np.mean(figures["reference_margin"], 0)[target]
    assert np.shape(figures["reference_margin"]) == np.shape(figures["reference_margin_baseline"]) == (3, 10)
    shortcut = shortcut_verdict(ladder.budgets, ladder.success, **figures)
    assert shortcut.target_class == target and shortcut.verdict == "suspicious"


def test_scan_and_cli_take_the_transfer_shortcut_and_untransferred_verdicts(monkeypatch, tmp_path):
    monkeypatch.setattr(ScanConfig, "universal_config", lambda self: QUICK)
    monkeypatch.setattr(ScanConfig, "reference_config", lambda self: FEW_STEPS)
    report = scan(SAMPLES / "badnets_op13.onnx", DATA, ScanConfig(samples=96, skip_layers="block",
                                                                   verdict="transfer", margin_restarts=4,
                                                                   margin_steps=60))
    assert report.verdict["method"] == "transfer" and report.verdict["target_class"] == TARGETS["badnets"]
    assert "reference networks trained on the scan's images" in report.format_text()
    v = report.verdict
    # the shortcut and untransferred verdicts through the CLI: the same ladder and references, so the transfer
    # report's figures give each of them
    from_figures = {
        "shortcut": (shortcut_verdict(v["budgets"], v["success"], v["held_out_margin"], v["reference_margin"],
                                      v["reference_margin_baseline"]), "Shortcut test"),
        "untransferred": (untransferred_verdict(v["budgets"], v["success"], v["reference_success"],
                                                v["reference_baseline"]), "Untransferred test")}
    for method, (again, section) in from_figures.items():
        result = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), "--data", str(DATA),
                                           "--samples", "96", "--skip-layers", "block", "--verdict", method,
                                           "--fail-on-suspicious", "--json", str(tmp_path / f"{method}.json"),
                                           "--html", str(tmp_path / f"{method}.html")])
        assert result.exit_code == 1 and "suspicious" in result.output, result.output
        saved = json.loads((tmp_path / f"{method}.json").read_text())
        assert saved["summary"]["verdict"] == "suspicious"
        again = again.to_dict()
        assert {k: saved["verdict"][k] for k in again if k != "basis"} == {k: again[k] for k in again if k != "basis"}
        assert saved["verdict"]["method"] == method and saved["verdict"]["target_class"] == TARGETS["badnets"]
        page = (tmp_path / f"{method}.html").read_text()
        assert section in page and page.count("data:image/png;base64") >= 3
