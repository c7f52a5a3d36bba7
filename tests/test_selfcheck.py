"""The repair checks itself (issue 31): the verdict on the model as given and on the repaired one, the status it
gives, one stronger try where the backdoor may persist, and the --fail-if-persists gate."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import QUICK_VERDICT, SAMPLES, quick_combined
from fmt_audit_cli.main import main

from fmt_audit.repair.selfcheck import STATUSES, status_of
from fmt_audit.report.json_report import format_self_check

DATA = SAMPLES / "defender.npz"
TARGET = json.loads((SAMPLES / "manifest.json").read_text())
TARGET = next(m["target"] for m in TARGET["models"] if m["attack"] == "badnets")


def _verdict(word: str, suspicion: float | None = 0.5, target: int | None = 3) -> dict:
    return {"method": "combined", "suspicion": suspicion, "verdict": word, "target_class": target,
            "threshold": 0.5, "basis": "figures"}


@pytest.mark.parametrize(("before", "after", "status"), [
    ("suspicious", "clean", "removed"),
    ("inconclusive", "clean", "removed"),
    (None, "clean", "removed"),
    ("clean", "clean", "not found"),
    ("suspicious", "suspicious", "may persist"),
    ("clean", "suspicious", "may persist"),
    ("suspicious", "inconclusive", "unknown"),
])
def test_the_status_follows_the_verdicts(before, after, status):
    given = None if before is None else _verdict(before, None if before == "inconclusive" else 0.5)
    assert status_of(_verdict(after, None if after == "inconclusive" else 0.5), given) == status
    assert status in STATUSES


@pytest.mark.parametrize(("leads", "status"), [(True, "may persist"), (False, "removed"), (None, "removed")])
def test_a_patch_that_still_leads_means_the_backdoor_may_persist(leads, status):
    patch = None if leads is None else {"leads": leads}
    assert status_of(_verdict("clean"), _verdict("suspicious"), patch) == status


def test_the_summary_names_the_patch_before_and_after_the_try():
    patch = {"target": 3, "success": 0.9, "size": 4, "best_other": 0.2, "median_other": 0.1, "leads": True}
    check = {"status": "removed", "before": _verdict("suspicious", 0.9), "after": _verdict("clean", 0.2),
             "patch": {**patch, "success": 0.05, "leads": False},
             "escalation": {"setting": "the patch's try", "after": _verdict("clean", 0.2),
                            "patch": {**patch, "success": 0.05, "leads": False}, "kept": True}}
    text = format_self_check(check)
    assert "a 4x4 patch sends 5.0% into class 3 (other classes at most 20.0%, median 10.0%): does not lead" in text
    assert "tried the patch's try: clean (suspicion 0.20); a 4x4 patch sends 5.0%" in text
    assert text.endswith("(kept)")


class _Said:        # a verdict as verdict_on returns it
    def __init__(self, figures: dict):
        self.figures = figures

    def to_dict(self) -> dict:
        return self.figures


@pytest.mark.parametrize("outcome", ["kept", "not kept", "not searched"])
def test_the_patch_try_is_kept_only_where_the_patch_no_longer_leads(monkeypatch, outcome):
    """The pipeline around the patch evidence, with the verdicts and the search stood in for (their own tests are
    above and in test_patch_evidence.py): where the patch leads on the repaired model, the patch's try runs; its
    model is kept only where the patch fitted again no longer leads (against the figures from before the try),
    else the repaired model is restored; a search that cannot run is a warning, not a failure."""
    import numpy as np

    from fmt_audit.repair import pipeline
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig
    from fmt_audit.repair.patch_evidence import FoundPatch, PatchEvidence
    from fmt_audit.repair.selfcheck import PATCH_ESCALATION

    searched = []       # the models the search ran on

    def verdict_on(loaded, model, *args):
        word = "suspicious" if model is loaded.proto else "clean"
        return _Said(_verdict(word, 0.9 if word == "suspicious" else 0.1, 0))

    def patch_on(loaded, model, dataset, preprocessing, device, config, target, before=None):
        searched.append(model)
        if outcome == "not searched":
            return None, "the check's 20 images hold fewer than 32 of other classes"
        success = 0.05 if before is not None and outcome == "kept" else 0.9
        anchor = before.anchor if before else FoundPatch(target, 0.95, (0, 0), np.full((1, 2, 2), 0.5, np.float32))
        return PatchEvidence(anchor, FoundPatch(target, success, anchor.spot, anchor.content),
                             before.references if before else {1: 0.1, 2: 0.2}, 1, 1.5), None

    monkeypatch.setattr(pipeline, "verdict_on", verdict_on)
    monkeypatch.setattr(pipeline, "patch_on", patch_on)
    result = pipeline.repair(SAMPLES / "badnets_op13.onnx", DATA,
                             RepairConfig(FineTuneConfig(epochs=1, seed=0), unlearn_eps=0.05),
                             flagged={"/block1/conv1/Conv": [0]}, check=QUICK_VERDICT)
    check, report = result.report.self_check, result.report.to_dict()
    if outcome == "not searched":
        assert check["status"] == "removed" and check["patch"] is None and check["escalation"] is None
        assert any("no patch search (the check's 20 images" in w for w in report["warnings"])
        assert report["timing"]["patch_check_s"] is None
        return
    escalation = check["escalation"]
    assert escalation["setting"].startswith(PATCH_ESCALATION) and escalation["stamps"] == 1
    assert escalation["eps"] is None and isinstance(escalation["flip"], bool)
    assert escalation["patch"]["references"] == check["patch"]["references"] == {"1": 0.1, "2": 0.2}
    assert len(searched) == 2 and report["timing"]["patch_check_s"] == 3.0
    initializers = {t.name: t.raw_data for t in result.model.graph.initializer}
    before_try = {t.name: t.raw_data for t in searched[0].graph.initializer}
    if outcome == "kept":
        assert check["status"] == "removed" and escalation["kept"] is True
        assert check["patch"]["success"] == 0.05 and check["patch"]["leads"] is False
        assert result.model is searched[1] and initializers != before_try
    else:
        assert check["status"] == "may persist" and escalation["kept"] is False
        assert check["patch"]["success"] == 0.9 and check["patch"]["leads"] is True
        assert result.model is searched[0] and initializers == before_try


def test_the_summary_names_both_verdicts_and_the_stronger_try():
    check = {"status": "may persist", "before": _verdict("suspicious", 0.9), "after": _verdict("suspicious", 0.8),
             "escalation": {"setting": "unlearning at twice the radius", "after": _verdict("suspicious", 0.7),
                            "kept": False}}
    text = format_self_check(check)
    assert text.startswith("self-check   may persist: combined verdict on the repaired model suspicious "
                           "(suspicion 0.80, class 3); on the model as given suspicious (suspicion 0.90, class 3)")
    assert "tried unlearning at twice the radius: suspicious (suspicion 0.70, class 3) (not kept: no better)" in text


@pytest.mark.slow     # a repair, its self-check, the patch search and the stronger try: about a minute each
@pytest.mark.parametrize("patch_check", [True, False])
def test_a_repair_that_changed_nothing_may_persist_and_the_gate_fails(monkeypatch, tmp_path, patch_check):
    """Fine-tuning at the smallest learning rate leaves the BadNets sample as it was: the verdict still names
    its target after the repair, and so does the patch search (where it runs); the stronger try (the patch
    stamped in where it leads, else unlearning at twice the radius) does not change that, and --fail-if-persists
    exits 1 with the repaired model and the report written."""
    quick_combined(monkeypatch)
    from fmt_audit.verdict.evidence import transfer

    trained = []    # (images, seed) of every reference network trained
    original = transfer.train_reference

    def counted(dataset, classes, device="cpu", config=None, seed=0):
        trained.append((hash(dataset.x.tobytes()), seed))
        return original(dataset, classes, device, config, seed)

    monkeypatch.setattr(transfer, "train_reference", counted)
    out, report = tmp_path / "r.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(main, ["repair", str(SAMPLES / "badnets_op13.onnx"), "--data", str(DATA),
                                       "--samples", "16", "--skip-layers", "block", "--epochs", "1", "--lr", "1e-4",
                                       "--verdict-samples", "96", "--fail-if-persists", "-o", str(out),
                                       "--json", str(report), "--html", str(tmp_path / "r.html"),
                                       "--patch-check" if patch_check else "--no-patch-check"])
    assert result.exit_code == 1, result.output
    assert "the self-check says: may persist" in result.output and out.is_file()
    check = json.loads(report.read_text())["self_check"]
    assert check["status"] == "may persist"
    assert check["before"]["verdict"] == check["after"]["verdict"] == "suspicious"
    assert check["before"]["target_class"] == check["after"]["target_class"] == TARGET
    if patch_check:     # the BadNets trigger is a 3 x 3 square in the corner; the patch is 2 x 2
        assert check["patch"]["target"] == TARGET and check["patch"]["leads"] is True, check["patch"]
        assert check["patch"]["success"] > 0.5 and check["patch"]["size"] == 2
        assert check["escalation"]["setting"].startswith("the repair's fine-tuning again")
        # the try is judged again at the same anchor, against the other classes' figures from before it
        assert check["escalation"]["patch"]["spot"] == check["patch"]["spot"]
        assert check["escalation"]["patch"]["references"] == check["patch"]["references"]
        assert "patch sends" in result.output and f"into class {TARGET}" in result.output
    else:
        assert check["patch"] is None and check["escalation"]["patch"] is None
        assert check["escalation"]["setting"].startswith("unlearning at twice the radius")
    assert check["escalation"]["kept"] is False and check["escalation"]["after"]["verdict"] == "suspicious"
    assert "self-check   may persist" in result.output
    assert "<h2>Self-check: may persist</h2>" in (tmp_path / "r.html").read_text()
    # the check's verdicts (after, the stronger try) share one set of reference networks
    assert trained and len(trained) == len(set(trained)), trained


def test_no_self_check_without_a_verdict_or_without_data(tmp_path):
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig
    from fmt_audit.repair.pipeline import repair

    result = CliRunner().invoke(main, ["repair", str(SAMPLES / "badnets_op13.onnx"), "--data", str(DATA),
                                       "--method", "ft", "--epochs", "0", "--verdict", "none", "--fail-if-persists",
                                       "-o", str(tmp_path / "r.onnx"), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1 and "not run" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["self_check"] is None
    # clp without data: nothing to check on
    clp = repair(SAMPLES / "badnets_op13.onnx", None, RepairConfig(FineTuneConfig(epochs=0), method="clp"),
                 check=QUICK_VERDICT)
    assert clp.report.self_check is None


@pytest.mark.slow
def test_a_repair_that_removed_the_backdoor_says_so(monkeypatch):
    """The published repair with the gradient scan removes the BadNets sample's backdoor (ASR 6.8%, README): the
    verdict named the target before and finds no backdoor after."""
    from fmt_audit.fmt.scan import ScanConfig
    from fmt_audit.repair.config import RepairConfig
    from fmt_audit.repair.pipeline import repair
    from fmt_audit.verdict import VerdictConfig

    quick_combined(monkeypatch)
    result = repair(SAMPLES / "badnets_op13.onnx", DATA, RepairConfig(), ScanConfig.from_preset("gradient"),
                    check=VerdictConfig(samples=96))
    check = result.report.self_check
    assert check["before"]["verdict"] == "suspicious" and check["before"]["target_class"] == TARGET
    assert check["status"] == "removed" and check["escalation"] is None, check


@pytest.mark.slow
def test_a_trace_repair_removes_what_the_scan_traces_without_the_channel_test(monkeypatch):
    """``repair --selection trace`` removes the channels ``scan --selection trace`` flags on the same training
    split, from the same verdict, which is also the self-check's verdict before; no channel is tested one by
    one (the per-channel scores would decide nothing)."""
    import fmt_audit.fmt.scan
    import fmt_audit.repair.pipeline
    import fmt_audit.verdict.evidence.transfer
    from fmt_audit.data import load_data
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.model.loading import load_model
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig
    from fmt_audit.repair.pipeline import repair
    from fmt_audit.report.html_report import repair_html
    from fmt_audit.verdict import VerdictConfig
    from fmt_audit.verdict.config import ReferenceConfig

    quick_combined(monkeypatch)
    model = SAMPLES / "badnets_op13.onnx"
    loaded = load_model(model)
    data = load_data(DATA, loaded.image_input, loaded.num_classes)
    config, scan_config = RepairConfig(FineTuneConfig(epochs=2)), ScanConfig(selection="trace", samples=32)
    check = VerdictConfig(samples=96)       # the removal's verdict: the check's settings, on the training split
    scanned = scan(model, data.split(config.holdout, seed=scan_config.seed)[0], scan_config, verdict=check)

    def no_channel_test(*args, **kwargs):
        raise AssertionError("the per-channel test ran")

    monkeypatch.setattr(fmt_audit.fmt.scan, "score_layers", no_channel_test)
    trained, checked_on = [], []
    train_one = fmt_audit.verdict.evidence.transfer.train_reference
    monkeypatch.setattr(fmt_audit.verdict.evidence.transfer, "train_reference",
                        lambda *a, **k: trained.append(1) or train_one(*a, **k))
    verdict_on = fmt_audit.repair.pipeline.verdict_on
    monkeypatch.setattr(fmt_audit.repair.pipeline, "verdict_on",
                        lambda loaded, model, images, *a, **k: checked_on.append(len(images))
                        or verdict_on(loaded, model, images, *a, **k))
    stages = []
    result = repair(model, data, config, scan_config, check=check, progress=lambda step, done, total:
                    stages.append(step) if total == 0 or done == total else None)
    report = result.report
    assert result.scan is None and report.source == "trace"
    # the removal's verdict counts its trigger search, then the trace; the self-check's verdict its own
    assert stages.index("trigger search") < stages.index("trace") < stages.index("self-check") \
        < stages.index("self-check (repaired): trigger search") < stages.index("self-check (repaired): smooth images")
    def ordered(channels):
        return {layer: sorted(numbers) for layer, numbers in channels.items()}

    assert ordered(report.flagged) == ordered(scanned.flagged) and report.flagged_count > 0
    assert report.evidence["verdict"] == scanned.verdict and report.evidence["trace"] == scanned.trace
    assert report.self_check["before"] == scanned.verdict
    # checked on the removal's images (the 180 of the training split, not all 200): the references trained for
    # its verdict serve the verdict after it, so one set of them is trained
    assert checked_on == [180] and len(trained) == ReferenceConfig().count
    assert report.self_check["status"] in ("removed", "may persist")
    # the trace's reversed triggers (one per round that cut) are stamped into half the unlearning copies
    assert report.config["unlearning"]["stamps"] == len(report.evidence["trace"]["rounds"]) - (
        "no longer anomalous" in report.evidence["trace"]["stop"]) > 0
    assert "trace: " in report.format_text() and "(from trace)" in report.format_text()
    page = repair_html(report)
    assert "The verdict the channels were traced from" in page and "Trigger search" in page
