"""The default verdict, ``combined``: the trigger search's mask ratio and the untransferred lead, each over its
cut, checked on the class named (the two tests agree; smooth random images favour it)."""

import json
import math

import pytest
from click.testing import CliRunner
from conftest import SAMPLES, quick_combined
from fmt_audit_cli.main import main

from fmt_audit.verdict import describe, figures
from fmt_audit.verdict.combined import (
    AGREEMENT,
    COMBINED,
    LEAD_CUT,
    RATIO_CUT,
    TransferFigures,
    TriggerFigures,
    combined_verdict,
    mask_ratio,
)

TARGETS = {m["attack"]: m["target"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]
           if m["attack"] != "none"}
DATA = SAMPLES / "defender.npz"
NOTHING = [[0.0] * 5]
# an untransferred test whose class 1 leads by 0.1 (under its cut); references that move nothing
LEAD = TransferFigures([0.01], [[0.3, 0.9, 0.8, 0.0, 0.0]], NOTHING, NOTHING)


def value(verdict):
    return verdict.suspicion / (1 - verdict.suspicion)


def test_the_mask_ratio_is_how_many_times_smaller_the_smallest_mask_is_than_the_median():
    assert mask_ratio([0.02, 0.1, 0.12, 0.09, 0.11]) == (0, pytest.approx(5.0))
    assert mask_ratio([0.1, 0.1, 0.1]) == (0, 1.0)
    assert mask_ratio([0.3, 0.0, 0.2]) == (1, math.inf)
    assert mask_ratio([0.0, 0.0, 0.0]) == (0, 1.0)


def test_the_combined_verdict_is_the_larger_of_the_two_over_their_cuts():
    # class 3's mask is the median's / 5: log 5 / log 2.5 = 1.76 times the cut, more than the lead's 0.29
    small = TriggerFigures([0.1, 0.12, 0.09, 0.02, 0.11], [0.5, 0.5, 0.5, 0.9, 0.5], [True] * 5)
    verdict = combined_verdict(small, LEAD)
    ratio = math.log(0.1 / 0.02) / math.log(RATIO_CUT)
    assert verdict.method == "combined" and verdict.target_class == 3 and verdict.verdict == "suspicious"
    # the tests name different classes: divided by sqrt(1.5)
    assert value(verdict) == pytest.approx(ratio / AGREEMENT ** 0.5, rel=1e-5)
    assert verdict.details["mask_ratio"] == pytest.approx(5.0) and verdict.details["lead"] == pytest.approx(0.1)
    assert verdict.details["cleanse_class"] == 3 and verdict.details["untransferred_class"] == 1
    assert verdict.details["tests_agree"] is False
    # both tests' figures are kept, so the report shows (and a reader can recompute) both
    assert verdict.details["norms"] == [0.1, 0.12, 0.09, 0.02, 0.11] and verdict.details["success"] == LEAD.success
    text = describe(verdict.to_dict())
    assert "class 3's smallest reversed trigger covers 2.0% of the pixels, the median class's 10.0%" in text
    assert "5 times smaller (counts from 2.5)" in text and "class 1's perturbation" in text
    assert "(counts from 35%)" in text and "the two tests name different classes" in text
    assert [f.title for f in figures(verdict.to_dict())] == ["Trigger search", "Untransferred test"]
    # near-equal masks: the lead decides, and names its class
    even = TriggerFigures([0.1, 0.12, 0.09, 0.08, 0.11])
    strong = TransferFigures([0.01], [[0.0, 0.9, 0.3, 0.0, 0.0]], NOTHING, NOTHING)     # lead 0.6
    both = combined_verdict(even, strong)
    assert both.target_class == 1 and both.verdict == "suspicious"
    assert value(both) == pytest.approx(0.6 / LEAD_CUT / AGREEMENT ** 0.5, rel=1e-5)
    assert combined_verdict(even, LEAD).verdict == "clean" and COMBINED.threshold == 0.5


def test_checks_on_the_class_named_scale_the_evidence():
    base = 0.1 / LEAD_CUT
    same = TriggerFigures([0.1, 0.1, 0.1, 0.1, 0.1])      # ratio 1 (nothing), smallest mask: class 0
    other = TriggerFigures([0.1, 0.05, 0.1, 0.1, 0.1])    # ratio 2: log 2 / log 2.5 = 0.76 for class 1
    ratio = math.log(2) / math.log(RATIO_CUT)
    assert AGREEMENT == 1.5
    # both tests name class 1 and smooth images favour it: x1.5; both checks against: / 1.5
    agreed = combined_verdict(other, LEAD, smooth=[0.1, 0.6, 0.1, 0.1, 0.1])
    assert agreed.target_class == 1 and value(agreed) == pytest.approx(ratio * 1.5, rel=1e-5)
    assert agreed.details["tests_agree"] and agreed.details["smooth_agrees"] and agreed.details["smooth_class"] == 1
    assert agreed.details["agreement_factor"] == pytest.approx(1.5)
    text = describe(agreed.to_dict())
    assert "the two tests name the same class and smooth random images favour class 1 (60% of them): x1.5" in text
    assert "Smooth-input test" in [f.title for f in figures(agreed.to_dict())]
    against = combined_verdict(same, LEAD, smooth=[0.6, 0.1, 0.1, 0.1, 0.1])     # class 0's mask, class 1's lead
    assert against.target_class == 1 and value(against) == pytest.approx(base / 1.5, rel=1e-5)
    assert not against.details["tests_agree"] and not against.details["smooth_agrees"]
    # one for, one against: unchanged; without smooth images only the tests' check counts
    mixed = combined_verdict(other, LEAD, smooth=[0.6, 0.1, 0.1, 0.1, 0.1])
    assert value(mixed) == pytest.approx(ratio, rel=1e-5) and mixed.details["agreement_factor"] == 1.0
    assert value(combined_verdict(other, LEAD)) == pytest.approx(ratio * AGREEMENT ** 0.5, rel=1e-5)
    # the lead alone, checked by smooth images only: x sqrt(1.5)
    alone = combined_verdict("no data", LEAD, smooth=[0.1, 0.6, 0.1, 0.1, 0.1])
    assert "tests_agree" not in alone.details and value(alone) == pytest.approx(base * 1.5 ** 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="one finite smooth-image share per class"):
        combined_verdict(same, LEAD, smooth=[1.0])


def test_the_combined_verdict_uses_what_evidence_there_is():
    alone = combined_verdict("too few images", LEAD)
    assert value(alone) == pytest.approx(0.1 / LEAD_CUT, rel=1e-5) and alone.target_class == 1
    assert "no trigger search (too few images)" in alone.basis
    assert "mask_ratio" not in alone.details and "class 1's perturbation" in describe(alone.to_dict())
    empty = combined_verdict(TriggerFigures([0.3, 0.0, 0.2]), "no references")
    assert empty.suspicion == 1.0 and empty.target_class == 1 and empty.details["mask_ratio"] is None
    assert "infinitely smaller" in describe(empty.to_dict()) and "no untransferred test (no references)" in empty.basis
    unreached = combined_verdict(TriggerFigures([0.1, 0.1, 0.1], reached=[False] * 3), "no references")
    assert unreached.verdict == "inconclusive" and "no class's trigger reached" in unreached.basis
    neither = combined_verdict("too few images", "no references")
    assert neither.verdict == "inconclusive" and neither.suspicion is None and neither.method == "combined"
    with pytest.raises(ValueError, match="one trigger_success figure per class"):
        combined_verdict(TriggerFigures([0.1, 0.1, 0.1], success=[0.5]), LEAD)


def test_scan_and_cli_take_the_combined_verdict(monkeypatch, tmp_path):
    """The default verdict end to end, at a sliver of its effort: it names the BadNets sample's target, the
    gate follows it, and the report keeps the figures it follows from."""
    quick_combined(monkeypatch)
    result = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), "--data", str(DATA),
                                       "--samples", "16", "--skip-layers", "block", "--verdict-samples", "96",
                                       "--fail-on-suspicious", "--json", str(tmp_path / "r.json"),
                                       "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 1 and "smallest reversed trigger" in result.output, result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    v = saved["verdict"]
    assert v["method"] == "combined" and v["target_class"] == TARGETS["badnets"] and v["verdict"] == "suspicious"
    assert saved["summary"]["verdict"] == "suspicious" and v["cleanse_class"] == TARGETS["badnets"]
    assert len(v["smooth_shares"]) == 10 and sum(v["smooth_shares"]) == pytest.approx(1.0)
    # the verdict follows from the two tests' figures the report keeps
    again = combined_verdict(TriggerFigures(v["norms"], v["trigger_success"], v["reached"]),
                             TransferFigures(v["budgets"], v["success"], v["reference_success"],
                                             v["reference_baseline"]), smooth=v["smooth_shares"])
    assert again.suspicion == v["suspicion"] and again.target_class == v["target_class"]
    page = (tmp_path / "r.html").read_text()
    assert "Trigger search" in page and "Untransferred test" in page and "Smooth-input test" in page
    few = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), "--data", str(DATA),
                                    "--samples", "10", "--verdict-samples", "10", "--skip-layers", "block"])
    assert "inconclusive" in few.output and "held-out" in few.output, few.output


def test_the_verdict_tells_its_stages_and_counts_the_trigger_search(monkeypatch):
    """A verdict that runs for minutes (an hour on 43 classes) says where it is: the trigger search by its steps
    (every chunk of classes fitted together), then the ladder's rungs, the references, the smooth images."""
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.verdict import VerdictConfig

    quick_combined(monkeypatch)
    seen = []
    scan(SAMPLES / "badnets_op13.onnx", DATA, ScanConfig(samples=16, skip_layers="block"),
         progress=lambda step, done, total: seen.append((step, done, total)), verdict=VerdictConfig(samples=96))
    stages = [step for step, _, _ in seen]
    searched = [(done, total) for step, done, total in seen if step == "trigger search"]
    # 10 classes of 16 images each fit in one chunk of 512 images: the 100 steps once, from 0
    assert searched == [(k, 100) for k in range(101)]
    assert stages.index("combined verdict") < stages.index("trigger search") < stages.index("universal ladder")
    rungs = [step for step in stages if step.startswith("universal ladder (the rung at budget ")]
    assert rungs and stages.index("universal ladder") < stages.index(rungs[0])
    assert stages.index(rungs[-1]) < stages.index("reference networks") < stages.index("warp search")
    assert stages.index("warp search") < stages.index("smooth images")
    # the warp search by its steps: one budget of 20 steps (quick_combined), every class in one chunk
    assert [(done, total) for step, done, total in seen if step == "warp search"] == [(k, 20) for k in range(21)]
    after = seen[stages.index("combined verdict"):]     # the channels before it count channels
    assert all(total == 0 for step, _, total in after if step not in ("trigger search", "warp search"))
