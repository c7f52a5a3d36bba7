"""The combined verdict (issue 8): the trigger search's mask ratio and the untransferred lead, each over its cut,
and the checks on the class named (the two tests agree; smooth random images favour it)."""

import json
import math

import pytest
from click.testing import CliRunner
from conftest import SAMPLES
from fmt_audit_cli.main import main

from fmt_audit.errors import ConfigError
from fmt_audit.fmt.scan import ScanConfig
from fmt_audit.verdict import (
    COMBINED_AGREEMENT,
    COMBINED_LEAD,
    COMBINED_RATIO,
    COMBINED_THRESHOLD,
    CleanseConfig,
    ReferenceConfig,
    UniversalConfig,
    cleanse_verdict,
    combined_verdict,
    describe,
    inconclusive,
    mask_ratio,
    untransferred_verdict,
)

TARGETS = {m["attack"]: m["target"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]
           if m["attack"] != "none"}
DATA = SAMPLES / "defender.npz"

# an untransferred test whose class 1 leads by 0.1 (under its cut), as test_transfer's figures
BUDGETS, SUCCESS = [0.01], [[0.3, 0.9, 0.8, 0.0, 0.0]]
NOTHING = [[0.0] * 5]


def test_the_mask_ratio_is_how_many_times_smaller_the_smallest_mask_is_than_the_median():
    assert mask_ratio([0.02, 0.1, 0.12, 0.09, 0.11]) == (0, pytest.approx(5.0))
    assert mask_ratio([0.1, 0.1, 0.1]) == (0, 1.0)
    assert mask_ratio([0.3, 0.0, 0.2]) == (1, math.inf)
    assert mask_ratio([0.0, 0.0, 0.0]) == (0, 1.0)


def test_the_combined_verdict_is_the_larger_of_the_two_over_their_cuts():
    lead = untransferred_verdict(BUDGETS, SUCCESS, NOTHING, NOTHING)        # 0.1: under the cut
    assert lead.suspicion == pytest.approx(0.1) and lead.target_class == 1
    # class 3's mask is the median's / 5: log 5 / log 2.5 = 1.76 times the cut, more than the lead's 0.29
    small = cleanse_verdict([0.1, 0.12, 0.09, 0.02, 0.11], [0.5, 0.5, 0.5, 0.9, 0.5], [True] * 5)
    verdict = combined_verdict(small, lead, agreement=1)      # no checks on the class: session 17's rule
    value = math.log(0.1 / 0.02) / math.log(COMBINED_RATIO)
    assert verdict.method == "combined" and verdict.target_class == 3 and verdict.verdict == "suspicious"
    assert verdict.suspicion == pytest.approx(value / (value + 1), abs=1e-6)
    assert verdict.details["mask_ratio"] == pytest.approx(5.0) and verdict.details["lead"] == pytest.approx(0.1)
    assert verdict.details["cleanse_class"] == 3 and verdict.details["untransferred_class"] == 1
    assert verdict.details["lead_cut"] == COMBINED_LEAD == 0.35
    # both tests' figures are kept, so the report shows (and a reader can recompute) both
    assert verdict.details["norms"] == small.details["norms"] and verdict.details["success"] == SUCCESS
    text = describe(verdict.to_dict())
    assert "class 3's smallest reversed trigger covers 2.0% of the pixels, the median class's 10.0%" in text
    assert "5 times smaller (counts from 2.5)" in text and "class 1's perturbation" in text
    assert "(counts from 35%)" in text
    # near-equal masks: the lead decides, and names its class
    even = cleanse_verdict([0.1, 0.12, 0.09, 0.08, 0.11])
    strong = untransferred_verdict(BUDGETS, [[0.0, 0.9, 0.3, 0.0, 0.0]], NOTHING, NOTHING)     # lead 0.6
    both = combined_verdict(even, strong, agreement=1)
    value = 0.6 / COMBINED_LEAD
    assert both.target_class == 1 and both.suspicion == pytest.approx(value / (value + 1), abs=1e-6)
    assert both.verdict == "suspicious"
    # the lead's cut is a parameter: session 16's rule counted it from the untransferred threshold, 0.2
    earlier = combined_verdict(even, lead, lead_cut=0.2, agreement=1)
    assert earlier.suspicion == pytest.approx(1 / 3) and earlier.details["lead_cut"] == 0.2
    assert "(counts from 20%)" in describe(earlier.to_dict())
    with pytest.raises(ConfigError, match="lead cut must be positive; got 0"):
        combined_verdict(even, lead, lead_cut=0)
    # a mask 2.5 times below the median's is the cut, suspicion 0.5; anything under it is clean
    at_cut = combined_verdict(cleanse_verdict([0.04, 0.1, 0.1, 0.1, 0.1]), lead, agreement=1)
    assert at_cut.suspicion == pytest.approx(COMBINED_THRESHOLD) and COMBINED_THRESHOLD == 0.5
    assert combined_verdict(even, lead).verdict == "clean"


def test_checks_on_the_class_named_scale_the_evidence():
    lead = untransferred_verdict(BUDGETS, SUCCESS, NOTHING, NOTHING)        # names class 1, 0.1 over 0.35
    base = 0.1 / COMBINED_LEAD
    same = cleanse_verdict([0.1, 0.1, 0.1, 0.1, 0.1])      # ratio 1 (nothing), smallest mask: class 0
    other = cleanse_verdict([0.1, 0.05, 0.1, 0.1, 0.1])    # ratio 2: log 2 / log 2.5 = 0.76 for class 1

    def value(verdict):
        return verdict.suspicion / (1 - verdict.suspicion)
    root = COMBINED_AGREEMENT ** 0.5
    assert COMBINED_AGREEMENT == 1.5
    # both tests name class 1 and smooth images favour it: x1.5; both checks against: / 1.5
    ratio = math.log(2) / math.log(COMBINED_RATIO)
    agreed = combined_verdict(other, lead, smooth=[0.1, 0.6, 0.1, 0.1, 0.1])
    assert agreed.target_class == 1 and value(agreed) == pytest.approx(ratio * 1.5, rel=1e-5)
    assert agreed.details["tests_agree"] and agreed.details["smooth_agrees"] and agreed.details["smooth_class"] == 1
    assert agreed.details["agreement_factor"] == pytest.approx(1.5)
    text = describe(agreed.to_dict())
    assert "the two tests name the same class and smooth random images favour class 1 (60% of them): x1.5" in text
    against = combined_verdict(same, lead, smooth=[0.6, 0.1, 0.1, 0.1, 0.1])     # class 0's mask, class 1's lead
    assert against.target_class == 1 and value(against) == pytest.approx(base / 1.5, rel=1e-5)
    assert not against.details["tests_agree"] and not against.details["smooth_agrees"]
    assert "the two tests name different classes" in describe(against.to_dict())
    # one for, one against: unchanged; without smooth images only the tests' check counts
    mixed = combined_verdict(other, lead, smooth=[0.6, 0.1, 0.1, 0.1, 0.1])
    assert value(mixed) == pytest.approx(ratio, rel=1e-5) and mixed.details["agreement_factor"] == 1.0
    assert value(combined_verdict(other, lead)) == pytest.approx(ratio * root, rel=1e-5)
    # the lead alone, checked by smooth images only: x sqrt(1.5)
    alone = combined_verdict(inconclusive("cleanse", "no data"), lead, smooth=[0.1, 0.6, 0.1, 0.1, 0.1])
    assert "tests_agree" not in alone.details and value(alone) == pytest.approx(base * root, rel=1e-5)
    # agreement 1: the checks are reported but change nothing (session 17's rule)
    plain = combined_verdict(same, lead, smooth=[0.6, 0.1, 0.1, 0.1, 0.1], agreement=1)
    assert value(plain) == pytest.approx(base, rel=1e-5) and plain.details["agreement_factor"] == 1.0
    with pytest.raises(ConfigError, match="agreement factor must be at least 1; got 0.5"):
        combined_verdict(same, lead, agreement=0.5)
    with pytest.raises(ValueError, match="one finite smooth-image share per class"):
        combined_verdict(same, lead, smooth=[1.0])


def test_the_combined_verdict_uses_what_evidence_there_is():
    lead = untransferred_verdict(BUDGETS, SUCCESS, NOTHING, NOTHING)
    missing = inconclusive("cleanse", "no cleanse evidence: too few images")
    alone = combined_verdict(missing, lead)
    value = 0.1 / COMBINED_LEAD
    assert alone.suspicion == pytest.approx(value / (value + 1), abs=1e-6) and alone.target_class == 1
    assert "no trigger search (no cleanse evidence: too few images)" in alone.basis
    assert "mask_ratio" not in alone.details and "class 1's perturbation" in describe(alone.to_dict())
    empty = combined_verdict(cleanse_verdict([0.3, 0.0, 0.2]), inconclusive("untransferred", "no references"))
    assert empty.suspicion == 1.0 and empty.target_class == 1 and empty.details["mask_ratio"] is None
    assert "infinitely smaller" in describe(empty.to_dict())
    neither = combined_verdict(missing, inconclusive("untransferred", "no references"))
    assert neither.verdict == "inconclusive" and neither.suspicion is None and neither.method == "combined"


def test_scan_and_cli_take_the_combined_verdict(monkeypatch, tmp_path):
    monkeypatch.setattr(ScanConfig, "cleanse_config", lambda self: CleanseConfig(steps=100, images=16))
    monkeypatch.setattr(ScanConfig, "universal_config", lambda self: UniversalConfig(images=16, steps=8))
    monkeypatch.setattr(ScanConfig, "reference_config", lambda self: ReferenceConfig(steps=150))
    result = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), "--data", str(DATA),
                                       "--samples", "96", "--skip-layers", "block", "--verdict", "combined",
                                       "--fail-on-suspicious", "--json", str(tmp_path / "r.json"),
                                       "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 1 and "smallest reversed trigger" in result.output, result.output
    saved = json.loads((tmp_path / "r.json").read_text())
    v = saved["verdict"]
    assert v["method"] == "combined" and v["target_class"] == TARGETS["badnets"] and v["verdict"] == "suspicious"
    assert saved["summary"]["verdict"] == "suspicious" and v["cleanse_class"] == TARGETS["badnets"]
    # the verdict follows from the two tests' figures the report keeps
    assert len(v["smooth_shares"]) == 10 and sum(v["smooth_shares"]) == pytest.approx(1.0)
    assert "smooth random images favour class" in result.output
    again = combined_verdict(cleanse_verdict(v["norms"], v["trigger_success"], v["reached"]),
                             untransferred_verdict(v["budgets"], v["success"], v["reference_success"],
                                                   v["reference_baseline"]), smooth=v["smooth_shares"])
    assert again.suspicion == v["suspicion"] and again.target_class == v["target_class"]
    page = (tmp_path / "r.html").read_text()
    assert "Trigger search" in page and "Untransferred test" in page and "Smooth-input test" in page
