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


def test_the_summary_names_both_verdicts_and_the_stronger_try():
    check = {"status": "may persist", "before": _verdict("suspicious", 0.9), "after": _verdict("suspicious", 0.8),
             "escalation": {"setting": "unlearning at twice the radius", "after": _verdict("suspicious", 0.7),
                            "kept": False}}
    text = format_self_check(check)
    assert text.startswith("self-check   may persist: combined verdict on the repaired model suspicious "
                           "(suspicion 0.80, class 3); on the model as given suspicious (suspicion 0.90, class 3)")
    assert "tried unlearning at twice the radius: suspicious (suspicion 0.70, class 3) (not kept: no better)" in text


@pytest.mark.slow     # a repair, its self-check and the stronger try: 20 s of the quick suite's 6 minutes
def test_a_repair_that_changed_nothing_may_persist_and_the_gate_fails(monkeypatch, tmp_path):
    """Fine-tuning at the smallest learning rate leaves the BadNets sample as it was: the verdict still names
    its target after the repair, the stronger try does not change that, and --fail-if-persists exits 1 with
    the repaired model and the report written."""
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
                                       "--json", str(report), "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 1, result.output
    assert "the self-check says: may persist" in result.output and out.is_file()
    check = json.loads(report.read_text())["self_check"]
    assert check["status"] == "may persist"
    assert check["before"]["verdict"] == check["after"]["verdict"] == "suspicious"
    assert check["before"]["target_class"] == check["after"]["target_class"] == TARGET
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
