"""The reports' schema: versioned, checked, and read back only when it is a version this fmt-audit knows."""

import json

import pytest
from click.testing import CliRunner
from conftest import SAMPLES
from fmt_audit_cli.main import main

from fmt_audit.errors import DataError
from fmt_audit.report.json_report import ScanReport
from fmt_audit.report.schema import SCHEMA_VERSION, problems


@pytest.fixture(scope="module")
def scan_report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("schema") / "scan.json"
    result = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), "--data",
                                       str(SAMPLES / "defender.npz"), "--samples", "16", "--skip-layers", "block",
                                       "--verdict", "margin", "--margin-restarts", "2", "--margin-steps", "10",
                                       "--json", str(path)])
    assert result.exit_code == 0, result.output
    return json.loads(path.read_text())


def test_a_scan_report_carries_its_schema_version_and_matches_it(scan_report):
    assert scan_report["schema_version"] == SCHEMA_VERSION and scan_report["kind"] == "scan"
    assert problems(scan_report) == []


def test_the_schema_check_names_what_is_wrong(scan_report):
    broken = json.loads(json.dumps(scan_report))
    del broken["summary"]["flagged"]
    broken["layers"][0]["channels"] = "8"
    broken["verdict"]["suspicion"] = True
    assert problems(broken) == ["report.layers[0].channels: expected int, got str", "report.summary.flagged: missing",
                                "report.verdict.suspicion: expected int or float or null, got bool"]
    assert problems({"kind": "verdict"}) == ["kind: expected one of scan, repair, evaluation, comparison, got "
                                             "'verdict'"]
    assert problems([]) == ["the report is not a JSON object"]
    evaluation = {"schema_version": 2, "kind": "evaluation", "model": {"path": "m.onnx", "sha256": "0"},
                  "metrics": {"acc": 0.9, "asr": None, "ra": None, "clean_images": 10, "attack_images": 0},
                  "baseline": {"path": "b.onnx", "sha256": "1", "metrics": {"acc": "0.8"}}, "der": None, "config": {}}
    assert problems(evaluation) == ["report.baseline.metrics.acc: expected int or float, got str",
                                    "report.baseline.metrics.asr: missing", "report.baseline.metrics.ra: missing",
                                    "report.baseline.metrics.clean_images: missing",
                                    "report.baseline.metrics.attack_images: missing"]
    comparison = {"schema_version": 2, "kind": "comparison", "model": {"path": "m.onnx", "sha256": "0"},
                  "baseline": evaluation["metrics"], "config": {}, "methods": 5}
    assert problems(comparison) == ["report.methods: expected a list, got int"]


def test_a_report_of_a_newer_schema_or_another_kind_is_refused_and_an_unversioned_one_read(scan_report, tmp_path):
    unversioned = {k: v for k, v in scan_report.items() if k not in ("schema_version", "kind")}
    assert ScanReport.from_dict(unversioned).flagged_count == scan_report["summary"]["flagged"]
    for changed, value in (("schema_version", SCHEMA_VERSION + 1), ("kind", "repair")):
        path = tmp_path / f"{changed}.txt"      # not .json: the suite's schema check would refuse it, rightly
        path.write_text(json.dumps({**scan_report, changed: value}))
        with pytest.raises(DataError, match="not an fmt-audit scan report of schema version"):
            ScanReport.read(path)
