"""Fleet audits (issue 10): folders and manifests, one report per model, failures as rows, resuming, and Ray
(on this machine, 2 CPUs) giving the same reports as the sequential run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import QUICK_MARGIN, QUICK_MARGIN_ARGS, QUICK_VERDICT, SAMPLES, quick_combined
from fmt_audit_cli.main import main

from fmt_audit.errors import ConfigError
from fmt_audit.fleet import audit as fleet_module
from fmt_audit.fleet.audit import read_source, run_fleet
from fmt_audit.repair.selfcheck import STATUSES

FAST = {"samples": 8, "verdict": "margin", **QUICK_MARGIN}    # fleet options: the scan's and the verdict's
DATA = SAMPLES / "defender.npz"


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("clean_op13.onnx", "badnets_op13.onnx"):
        shutil.copy(SAMPLES / name, folder / name)
    (folder / "vendor").mkdir()
    (folder / "vendor" / "corrupt.onnx").write_bytes(b"not a model")
    return folder


def _scored(report_path) -> dict:
    """What must not depend on how the fleet ran: everything but timing and resources."""
    report = json.loads(report_path.read_text())
    return {key: report[key] for key in ("model", "layers", "summary", "verdict")} | {
        "config": {k: v for k, v in report["config"].items() if k != "device_used"}}


def test_a_folder_fleet_writes_every_report_and_records_a_failure_as_a_row(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = run_fleet(read_source(source), DATA, out, FAST, use_ray=False)
    assert [row.model for row in result.rows] == ["badnets_op13", "clean_op13", "vendor/corrupt"]
    corrupt = result.rows[2]
    assert corrupt.error and "not an ONNX model" in corrupt.error and corrupt.verdict is None
    for row in result.rows[:2]:
        assert row.error is None and row.verdict in ("clean", "suspicious", "inconclusive")
        assert (out / f"{row.model}.json").is_file() and (out / f"{row.model}.html").is_file()
        assert row.sha256 == json.loads((out / f"{row.model}.json").read_text())["model"]["sha256"]
    assert not (out / "vendor__corrupt.json").exists()
    summary = json.loads((out / "fleet.json").read_text())
    assert summary["models"] == 3 and summary["failed"] == 1
    csv_lines = (out / "fleet.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,verdict,suspicion") and len(csv_lines) == 4
    # the same report as a plain scan with the same options
    from fmt_audit.fmt.scan import ScanConfig, scan

    direct = scan(source / "badnets_op13.onnx", DATA, ScanConfig(samples=8), verdict=QUICK_VERDICT)
    stored = json.loads((out / "badnets_op13.json").read_text())
    assert stored["layers"] == json.loads(direct.to_json())["layers"]
    assert stored["verdict"] == direct.verdict


def test_a_rerun_keeps_what_was_done_the_same_way_and_redoes_the_rest(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run_fleet(read_source(source), DATA, out, FAST, use_ray=False)
    written = (out / "clean_op13.json").stat().st_mtime_ns
    again = run_fleet(read_source(source), DATA, out, FAST, use_ray=False)
    assert [row.skipped for row in again.rows] == [True, True, False]   # a failure is retried
    assert (out / "clean_op13.json").stat().st_mtime_ns == written
    assert again.rows[1].verdict is not None
    changed = run_fleet(read_source(source), DATA, out, {**FAST, "samples": 12}, use_ray=False)
    assert not any(row.skipped for row in changed.rows)
    assert json.loads((out / "clean_op13.json").read_text())["config"]["samples"] == 12
    forced = run_fleet(read_source(source), DATA, out, {**FAST, "samples": 12}, use_ray=False, force=True)
    assert not any(row.skipped for row in forced.rows)
    # a different model under the same name is audited anew
    shutil.copy(SAMPLES / "blended_op13.onnx", source / "clean_op13.onnx")
    swapped = run_fleet(read_source(source), DATA, out, {**FAST, "samples": 12}, use_ray=False)
    assert [row.skipped for row in swapped.rows] == [True, False, False]


def test_manifests_give_each_model_its_own_data_and_options(tmp_path):
    for name in ("clean_op13.onnx", "badnets_op18.onnx", "badnets_op18.onnx.data", "defender.npz", "test.npz"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    (tmp_path / "fleet.json").write_text(json.dumps({"models": [
        {"model": "clean_op13.onnx", "samples": 10},
        {"model": "badnets_op18.onnx", "data": "test.npz", "mean": [0.0], "std": [1.0]}]}))
    (tmp_path / "fleet.csv").write_text("model,data,samples,mean,std\nclean_op13.onnx,test.npz,6,0.5,0.5\n")
    for manifest, expected in (("fleet.json", {"clean_op13": 10, "badnets_op18": 8}), ("fleet.csv", {"clean_op13": 6})):
        out = tmp_path / f"out_{manifest}"
        out.mkdir()
        result = run_fleet(read_source(tmp_path / manifest), tmp_path / "defender.npz", out,
                           FAST, use_ray=False)
        assert not result.failed
        for name, samples in expected.items():
            assert json.loads((out / f"{name}.json").read_text())["config"]["samples"] == samples
    csv_report = json.loads((tmp_path / "out_fleet.csv" / "clean_op13.json").read_text())
    assert csv_report["config"]["mean"] == [0.5] and csv_report["config"]["std"] == [0.5]


@pytest.mark.parametrize("entry, message", [
    ({"model": "../elsewhere.onnx"}, "leads outside the manifest's folder"),
    ({"model": "/etc/passwd"}, "expected a path relative to the manifest's folder"),
    ({"model": "m.onnx", "data": "../../data.npz"}, "leads outside"),
    ({"model": "m.onnx", "learning_rate": 1}, "unknown option(s) learning_rate"),
    ({"model": "m.onnx", "samples": "many"}, "samples must be a whole number; got 'many'"),
    ({"model": "m.onnx", "data": 5}, "\"data\" must be a path"),
    ({"model": "m.onnx", "mean": 0.5}, "mean must be a list of numbers"),
    ({"model": "..onnx"}, "cannot name a report file"),
    ({"model": "m.onnx", "samples": True}, "samples must be a whole number; got true"),
    ({"model": "m.onnx", "samples": [1]}, "samples must be a whole number; got [1]"),
    ({"model": "m.onnx", "gain": False}, "gain must be a number; got false"),
    ({"model": "m.onnx", "seed": -1}, "--seed must be a whole number in 0..4294967295; got -1"),
    ({"model": "m.onnx", "epochs": "x"}, "epochs must be a whole number"),    # checked without --repair too
    ({"model": "m.onnx", "epochs": -1}, "m: --epochs must be 0 or more; got -1 (a repair option)"),
    ({"model": "m.onnx", "eps": "x"}, "eps must be a number or 'auto'"),
    ({"model": "m.onnx", "augment": 1}, "augment must be true or false"),
])
def test_bad_manifests_are_one_line_errors(tmp_path, entry, message):
    shutil.copy(SAMPLES / "clean_op13.onnx", tmp_path / "m.onnx")
    (tmp_path / "fleet.json").write_text(json.dumps([entry]))
    result = CliRunner().invoke(main, ["fleet", str(tmp_path / "fleet.json"), "--data", str(DATA),
                                       "--out", str(tmp_path / "out"), "--sequential"])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1


def without_self_check(monkeypatch) -> None:
    """Fleet repairs without the self-check's verdict on the repaired model: for tests about other things
    (it doubles their time); test_a_fleet_repair_writes_what_fmt_audit_repair_writes covers it."""
    repaired = fleet_module._repaired

    def unchecked(model, data, config, settings, report, output, check, references=None):
        return repaired(model, data, config, settings, report, output, None, references)

    monkeypatch.setattr(fleet_module, "_repaired", unchecked)


@pytest.mark.slow     # two scans with the combined verdict and a repair through the CLI: 17 s
def test_without_ray_the_cli_says_so_and_runs_in_process(source, tmp_path, monkeypatch):
    monkeypatch.setattr(fleet_module, "ray_available", lambda: False)
    without_self_check(monkeypatch)
    quick_combined(monkeypatch)
    shutil.rmtree(source / "vendor")
    result = CliRunner().invoke(main, ["fleet", str(source), "--data", str(DATA), "--out", str(tmp_path / "out"),
                                       "--samples", "8", "--verdict-samples", "96",
                                       "--fail-on-suspicious",
                                       "--repair", "--epochs", "0", "--no-augment", "--unlearn-eps", "0.05"])
    assert "Ray is not installed" in result.output
    assert (tmp_path / "out" / "badnets_op13.repaired.onnx").is_file()
    assert json.loads((tmp_path / "out" / "badnets_op13.repair.json").read_text())["config"]["augment"] is False
    assert "sequential, in this process (Ray is not installed)" in result.output
    assert result.exit_code == 1    # the BadNets sample is suspicious
    assert "badnets_op13" in result.output.splitlines()[-1]
    refused = CliRunner().invoke(main, ["fleet", str(source), "--data", str(DATA), "--out", str(tmp_path / "o2"),
                                        "--address", "auto"])
    assert refused.exit_code == 2 and "--address needs Ray" in refused.output


@pytest.mark.slow
def test_ray_on_this_machine_gives_the_sequential_reports(source, tmp_path):
    pytest.importorskip("ray")
    shutil.rmtree(source / "vendor")
    outs = {}
    for engine, use_ray in (("ray", True), ("sequential", False)):
        outs[engine] = tmp_path / engine
        outs[engine].mkdir()
        result = run_fleet(read_source(source), DATA, outs[engine], {**FAST, "max_memory": 256.0},
                           repair={"epochs": 1}, use_ray=use_ray, workers=2)
        assert not result.failed
        assert result.engine.startswith(engine)
    for name in ("badnets_op13", "clean_op13"):
        assert _scored(outs["ray"] / f"{name}.json") == _scored(outs["sequential"] / f"{name}.json")
        repaired = {engine: json.loads((out / f"{name}.repair.json").read_text()) for engine, out in outs.items()}
        assert repaired["ray"]["flagged"] == repaired["sequential"]["flagged"]
        assert repaired["ray"]["verification"]["checker"] == "passed"
        assert (outs["ray"] / f"{name}.repaired.onnx").is_file()
    # each task reserves its --max-memory: one larger than any node is refused, not left waiting
    with pytest.raises(Exception, match="largest Ray node offers"):
        run_fleet(read_source(source), DATA, tmp_path / "huge", {**FAST, "max_memory": 2.0**30}, workers=2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mask", "gradient"])
def test_a_scan_split_over_ray_workers_gives_the_local_report(mode):
    pytest.importorskip("ray")
    from fmt_audit.fleet.ray_engine import ray_runner
    from fmt_audit.fmt.scan import ScanConfig, scan

    config = ScanConfig(mode=mode, samples=16)
    local = scan(SAMPLES / "badnets_op13.onnx", DATA, config, verdict=QUICK_VERDICT)
    split = scan(SAMPLES / "badnets_op13.onnx", DATA, config, runner=ray_runner(workers=2), verdict=QUICK_VERDICT)
    from fmt_audit.fleet.ray_engine import chunks
    from fmt_audit.model.loading import load_model

    assert len(chunks(list(load_model(SAMPLES / "badnets_op13.onnx").layers), 2 * 2)) == 4   # 4 tasks on 2 CPUs
    assert json.loads(split.to_json())["layers"] == json.loads(local.to_json())["layers"]
    assert split.verdict == local.verdict and split.config["eps"] == local.config["eps"]
    assert split.config["layers_device_used"] == "cpu" and "layers_device_used" not in local.config


def test_layer_chunks_are_consecutive_and_balanced():
    from fmt_audit.fleet.ray_engine import chunks
    from fmt_audit.model.graph import ConvLayer

    layers = [ConvLayer(f"c{i}", i, "o", "w", None, c, 3, (3, 3), (1, 1), 1, True)
              for i, c in enumerate([8, 8, 16, 16, 32, 32, 64, 64])]
    parts = chunks(layers, 4)
    assert [layer for part in parts for layer in part] == layers and 1 < len(parts) <= 4
    assert max(sum(layer.out_channels for layer in part) for part in parts) <= 128
    assert chunks(layers[:2], 8) == [[layers[0]], [layers[1]]]


def test_the_fleet_writes_over_no_input_and_no_file_it_did_not_write(tmp_path):
    shutil.copy(SAMPLES / "clean_op13.onnx", tmp_path / "m.onnx")
    (tmp_path / "fleet.json").write_text(json.dumps([{"model": "m.onnx"}]))
    over_manifest = CliRunner().invoke(main, ["fleet", str(tmp_path / "fleet.json"), "--data", str(DATA),
                                              "--out", str(tmp_path), "--sequential"])
    assert over_manifest.exit_code == 2 and "refusing to overwrite the input" in over_manifest.output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "m.json").write_text("{}")     # the user's own file, not a report
    with pytest.raises(Exception, match="no earlier fleet run wrote it"):
        run_fleet(read_source(tmp_path / "fleet.json"), DATA, tmp_path / "out", FAST, use_ray=False)
    assert (tmp_path / "out" / "m.json").read_text() == "{}"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "fleet.csv").write_text("my,own,table\n")
    with pytest.raises(Exception, match="no earlier fleet run wrote it"):
        run_fleet(read_source(tmp_path / "fleet.json"), DATA, tmp_path / "mine", FAST, use_ray=False)


def test_csv_rows_longer_than_the_header_are_one_line_errors(tmp_path):
    shutil.copy(SAMPLES / "clean_op13.onnx", tmp_path / "m.onnx")
    (tmp_path / "fleet.csv").write_text("model,samples\nm.onnx,8,extra\n")
    result = CliRunner().invoke(main, ["fleet", str(tmp_path / "fleet.csv"), "--data", str(DATA),
                                       "--out", str(tmp_path / "out"), "--sequential"])
    assert result.exit_code == 2 and "more cells than the header" in result.output


def test_names_with_dots_get_their_own_reports_and_colliding_names_are_refused(tmp_path):
    for name in ("resnet.v1.onnx", "resnet.v2.onnx"):
        shutil.copy(SAMPLES / "clean_op13.onnx", tmp_path / name)
    result = run_fleet(read_source(tmp_path), DATA, tmp_path / "out", FAST, use_ray=False)
    assert [row.model for row in result.rows] == ["resnet.v1", "resnet.v2"]
    assert (tmp_path / "out" / "resnet.v1.json").is_file() and (tmp_path / "out" / "resnet.v2.json").is_file()
    (tmp_path / "a").mkdir()
    shutil.copy(SAMPLES / "clean_op13.onnx", tmp_path / "a" / "b.onnx")
    shutil.copy(SAMPLES / "clean_op13.onnx", tmp_path / "a__b.onnx")
    with pytest.raises(Exception, match="output files would share a name"):
        read_source(tmp_path)


def test_a_report_replaced_without_its_new_record_is_not_kept_later(source, tmp_path, monkeypatch):
    shutil.rmtree(source / "vendor")
    out = tmp_path / "out"
    run_fleet(read_source(source), DATA, out, FAST, use_ray=False)
    real_write = fleet_module.write_atomic

    def no_record(path, payload):   # the run is killed between the report and its final record
        if str(path).endswith(fleet_module.RECORD_SUFFIX) and b'"pending"' not in payload:
            raise KeyboardInterrupt
        real_write(path, payload)

    monkeypatch.setattr(fleet_module, "write_atomic", no_record)
    with pytest.raises(KeyboardInterrupt):
        run_fleet(read_source(source), DATA, out, {**FAST, "samples": 12}, use_ray=False)
    monkeypatch.setattr(fleet_module, "write_atomic", real_write)
    again = run_fleet(read_source(source), DATA, out, FAST, use_ray=False)
    assert not again.rows[0].skipped    # its report now holds samples 12: redone, not kept as samples 8
    assert json.loads((out / "badnets_op13.json").read_text())["config"]["samples"] == 8


def test_a_fleet_repair_writes_what_fmt_audit_repair_writes(source, tmp_path):
    from fmt_audit.fmt.scan import ScanConfig
    from fmt_audit.repair.config import repair_config
    from fmt_audit.repair.pipeline import repair
    from fmt_audit.report.json_report import ScanReport

    shutil.rmtree(source / "vendor")
    out = tmp_path / "out"
    result = run_fleet(read_source(source), DATA, out, FAST, repair={"epochs": 1, "holdout": 0.2}, use_ray=False)
    row = result.rows[0]
    assert row.model == "badnets_op13" and row.repaired == "badnets_op13.repaired.onnx" and not row.error
    scanned = ScanReport.read(out / "badnets_op13.json")
    _, check = fleet_module.model_config(FAST, fleet_module.FleetModel("badnets_op13", source / "badnets_op13.onnx"))
    direct = repair(source / "badnets_op13.onnx", DATA, repair_config(0, epochs=1, holdout=0.2),
                    ScanConfig(samples=8), flagged=scanned, check=check)
    assert row.self_check == direct.report.self_check["status"] and row.self_check in STATUSES
    assert (out / "badnets_op13.repaired.onnx").read_bytes() == direct.model.SerializeToString()
    written = json.loads((out / "badnets_op13.repair.json").read_text())
    assert written["flagged"]["layers"] == direct.report.flagged and row.removed == direct.report.flagged_count
    assert written["output"]["path"] == str(out / "badnets_op13.repaired.onnx")
    assert row.accuracy_after == direct.report.accuracy["after"]
    assert (out / "badnets_op13.repair.html").read_text().startswith("<!DOCTYPE html>")
    assert "removed" in result.format_text().splitlines()[0]


@pytest.mark.slow     # two scans with verdicts and a repair: half a minute
def test_repair_when_suspicious_repairs_only_those_and_clears_an_earlier_repair(source, tmp_path, monkeypatch):
    shutil.rmtree(source / "vendor")
    out = tmp_path / "out"
    # the combined verdict, at a sliver of its effort, calls these two samples right (the maximum-margin test
    # calls the clean one suspicious)
    quick_combined(monkeypatch)
    without_self_check(monkeypatch)
    VERDICT = {"samples": 16, "verdict": "combined", "verdict_samples": 96}
    from fmt_audit.verdict.evidence import transfer

    trained = []
    original = transfer.train_reference
    monkeypatch.setattr(transfer, "train_reference", lambda *a: trained.append(a[-1]) or original(*a))
    everything = run_fleet(read_source(source), DATA, out, VERDICT, repair={"epochs": 0}, use_ray=False,
                           reference_cache=tmp_path / "references")
    assert [row.repaired is not None for row in everything.rows] == [True, True]
    assert len(trained) == 3 and len(list((tmp_path / "references").glob("*.npz"))) == 1   # two models: one set
    # what a Ray task runs, in a later process: the set is read from the folder, not trained
    job = fleet_module.FleetModel("badnets_op13", source / "badnets_op13.onnx")
    config, verdict = fleet_module.model_config(VERDICT, job)
    row = fleet_module._audit_in_worker(str(job.path), str(DATA), config, verdict, None, "always", "", None,
                                        str(tmp_path / "references"))
    assert row.get("error") is None and row["verdict"] == "suspicious" and len(trained) == 3
    assert (out / "clean_op13.repaired.onnx").is_file()
    record = json.loads((out / "clean_op13.fleet.json").read_text())   # a record is a file anyone may edit:
    record["files"].append("../victim.txt")                             # it names only this model's outputs
    (out / "clean_op13.fleet.json").write_text(json.dumps(record, indent=1))
    (tmp_path / "victim.txt").write_text("kept")
    some = run_fleet(read_source(source), DATA, out, VERDICT, repair={"epochs": 0}, repair_when="suspicious",
                     use_ray=False)
    verdicts = {row.model: row.verdict for row in some.rows}
    assert verdicts == {"badnets_op13": "suspicious", "clean_op13": "clean"}
    assert [row.repaired is not None for row in some.rows] == [True, False]
    assert not (out / "clean_op13.repaired.onnx").exists()     # no stale repair beside a report without one
    assert not any(row.skipped for row in some.rows)           # another configuration: redone
    assert (tmp_path / "victim.txt").read_text() == "kept"


def test_a_repaired_model_the_fleet_did_not_write_is_not_overwritten_and_a_cut_run_is_redone(
        source, tmp_path, monkeypatch):
    shutil.rmtree(source / "vendor")
    out = tmp_path / "out"
    out.mkdir()
    (out / "clean_op13.repaired.onnx").write_bytes(b"the user's own model")
    with pytest.raises(Exception, match="no earlier fleet run wrote it"):
        run_fleet(read_source(source), DATA, out, FAST, repair={"epochs": 0}, use_ray=False)
    assert (out / "clean_op13.repaired.onnx").read_bytes() == b"the user's own model"
    (out / "clean_op13.repaired.onnx").unlink()
    real_write = fleet_module.write_atomic

    def cut(path, payload):     # killed while writing the repaired model
        if str(path).endswith(fleet_module.REPAIRED_SUFFIX):
            Path(path).write_bytes(payload[:10])
            raise KeyboardInterrupt
        real_write(path, payload)

    monkeypatch.setattr(fleet_module, "write_atomic", cut)
    with pytest.raises(KeyboardInterrupt):
        run_fleet(read_source(source), DATA, out, FAST, repair={"epochs": 0}, use_ray=False)
    monkeypatch.setattr(fleet_module, "write_atomic", real_write)
    again = run_fleet(read_source(source), DATA, out, FAST, repair={"epochs": 0}, use_ray=False)
    assert not again.rows[0].skipped and again.rows[0].repaired
    import onnx

    onnx.checker.check_model(onnx.load(out / "badnets_op13.repaired.onnx"))


def test_manifest_models_set_their_own_repair_options(tmp_path):
    shutil.copy(SAMPLES / "clean_op13.onnx", tmp_path / "m.onnx")
    shutil.copy(SAMPLES / "clean_op13.onnx", tmp_path / "n.onnx")
    (tmp_path / "fleet.csv").write_text("model,method,epochs,augment\nm.onnx,ft,1,no\nn.onnx,clp,,\n")
    result = run_fleet(read_source(tmp_path / "fleet.csv"), DATA, tmp_path / "out", FAST, repair={"epochs": 0},
                       use_ray=False)
    assert not result.failed
    m = json.loads((tmp_path / "out" / "m.repair.json").read_text())
    n = json.loads((tmp_path / "out" / "n.repair.json").read_text())
    assert (m["method"], m["config"]["epochs"], m["config"]["augment"]) == ("ft", 1, False)
    assert n["method"] == "clp"
    (tmp_path / "bad.csv").write_text("model,augment\nm.onnx,maybe\n")
    with pytest.raises(Exception, match="augment must be true or false"):
        run_fleet(read_source(tmp_path / "bad.csv"), DATA, tmp_path / "out2", FAST, repair={}, use_ray=False)


def test_a_failed_repair_is_a_row_with_the_scan_and_is_retried(source, tmp_path, monkeypatch):
    from fmt_audit.errors import RepairError

    shutil.rmtree(source / "vendor")
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise RepairError("the repaired ONNX model disagrees with the fine-tuned PyTorch module")

    monkeypatch.setattr(fleet_module, "_repaired", broken)
    failed = run_fleet(read_source(source), DATA, out, FAST, repair={"epochs": 0}, use_ray=False)
    assert all(row.error.startswith("repair: the repaired ONNX model disagrees") for row in failed.rows)
    assert all(row.flagged is not None and (out / f"{row.model}.json").is_file() for row in failed.rows)
    monkeypatch.undo()
    again = run_fleet(read_source(source), DATA, out, FAST, repair={"epochs": 0}, use_ray=False)
    assert not any(row.skipped or row.error for row in again.rows) and all(row.repaired for row in again.rows)


def test_an_output_folder_inside_the_source_folder_is_not_read_as_models(source, tmp_path):
    shutil.rmtree(source / "vendor")
    args = ["fleet", str(source), "--data", str(DATA), "--out", str(source / "out"), "--sequential",
            "--samples", "8", *QUICK_MARGIN_ARGS, "--repair", "--epochs", "0"]
    for _ in range(2):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert "2 models, 0 failed" in result.output
    assert (source / "out" / "clean_op13.repaired.onnx").is_file()


@pytest.mark.parametrize("call, message", [
    (lambda s, o: run_fleet(s, DATA, o, {"sample": 8}, use_ray=False), "unknown scan option(s) sample"),
    (lambda s, o: run_fleet(s, DATA, o, FAST, repair={"epoch": 5}, use_ray=False), "unknown repair option(s) epoch"),
    (lambda s, o: run_fleet(s, DATA, o, FAST, repair={"epochs": 1.5}, use_ray=False), "whole number"),
])
def test_unknown_or_mistyped_options_are_refused(source, tmp_path, call, message):
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(read_source(source), tmp_path / "out")


def test_repair_options_without_repair_and_output_names_shared_by_two_models_are_refused(tmp_path):
    shutil.copy(SAMPLES / "clean_op13.onnx", tmp_path / "m.onnx")
    alone = CliRunner().invoke(main, ["fleet", str(tmp_path), "--data", str(DATA), "--out", str(tmp_path / "o"),
                                      "--epochs", "3"])
    assert alone.exit_code == 2 and "--epochs without --repair" in alone.output
    shutil.copy(SAMPLES / "clean_op13.onnx", tmp_path / "m.repair.onnx")   # its m.repair.json is m's repair report
    with pytest.raises(Exception, match="output files would share a name: m.repair.html, m.repair.json"):
        read_source(tmp_path)


@pytest.mark.slow
def test_ray_tasks_start_in_one_thread_workers_and_change_no_environment():
    pytest.importorskip("ray")
    import os

    import ray

    from fmt_audit.fleet.ray_engine import ray_session, task_options

    def worker_threads() -> tuple:     # defined here: Ray ships it by value (tests are not importable there)
        import torch

        return os.environ.get("OMP_NUM_THREADS"), os.environ.get("CUDA_VISIBLE_DEVICES"), torch.get_num_threads()

    ours_keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    before = {key: os.environ.get(key) for key in ours_keys}
    with ray_session(cpus=2):
        ours = ray.get(ray.remote(worker_threads).options(**task_options()).remote())
    assert ours == ("1", "", 1)
    assert {key: os.environ.get(key) for key in ours_keys} == before     # (Ray sets keys of its own here)


def test_a_manifest_names_the_class_output_of_a_model_with_several(tmp_path):
    """``class_output`` per model (issue 33): the fleet audits the output named, and the report says which."""
    from conftest import save
    from test_exporters import _two_headed

    save(_two_headed(), tmp_path / "two_heads.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.random((20, 3, 8, 8), dtype=np.float32), y=rng.integers(0, 5, 20))
    (tmp_path / "fleet.json").write_text(json.dumps({"models": [
        {"model": "two_heads.onnx", "class_output": "logits"}]}))
    out = tmp_path / "out"
    out.mkdir()
    result = run_fleet(read_source(tmp_path / "fleet.json"), tmp_path / "data.npz", out, {**FAST, "samples": 8},
                       use_ray=False)
    assert not result.failed
    assert json.loads((out / "two_heads.json").read_text())["model"]["class_output"] == "logits"
    (tmp_path / "bad.json").write_text(json.dumps([{"model": "two_heads.onnx", "class_output": 3}]))
    with pytest.raises(ConfigError, match="class_output"):
        read_source(tmp_path / "bad.json")
