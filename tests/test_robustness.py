"""Untrusted inputs and interrupted runs: one-line errors (exit 2), no traceback, no partial output."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import SAMPLES
from fmt_audit_cli.main import main
from onnx import numpy_helper

from fmt_audit.errors import DataError, ModelLoadError, OutputError
from fmt_audit.loading import load_model
from fmt_audit.outputs import write_atomic


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_exit_2(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def _with_nan_weight(tmp_path: Path) -> Path:
    model = onnx.load(SAMPLES / "clean_op13.onnx")
    weight = model.graph.initializer[0]
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, path)
    return path


def test_nan_weights_are_reported_and_repair_refused(tmp_path):
    path = _with_nan_weight(tmp_path)
    shown = _invoke("inspect", path)
    assert shown.exit_code == 0 and "NaN or Inf in weights" in shown.output
    scanned = _invoke("scan", path, "--data", SAMPLES / "defender.npz", "--samples", "4", "--skip-layers", "block",
                      "-o", tmp_path / "r.json")
    assert scanned.exit_code == 0 and "warning: NaN or Inf in 1 weight tensor" in scanned.output
    assert '"nonfinite_weights": [' in (tmp_path / "r.json").read_text()
    refused = _invoke("repair", path, "--data", SAMPLES / "defender.npz", "-o", tmp_path / "out.onnx")
    _one_line_exit_2(refused, "repair refused")
    assert not (tmp_path / "out.onnx").exists()


def test_multi_line_messages_reach_the_user_as_one_line(monkeypatch):
    import fmt_audit.inspection

    def broken(model):
        raise ModelLoadError("first line of the story\nsecond line\nthird")

    monkeypatch.setattr(fmt_audit.inspection, "summarize", broken)
    _one_line_exit_2(_invoke("inspect", SAMPLES / "clean_op13.onnx"), "first line of the story")


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": np.zeros((0, 1, 16, 16), np.float32), "y": np.zeros(0, np.int64)}, "empty"),
    ({"x": np.float32(0.5), "y": np.zeros(1, np.int64)}, "NCHW"),
    ({"x": np.zeros((2, 1, 16, 16), np.float32), "y": np.zeros(3, np.int64)}, "2 images but 3 labels"),
    ({"x": np.zeros((2, 16, 16), np.uint8), "y": np.array([0, 10])}, "outside the model's 10 classes"),
    ({"x": np.zeros((2, 16, 16), np.int32), "y": np.zeros(2, np.int64)}, "must be uint8"),
])
def test_malformed_data_files_exit_2(tmp_path, arrays, message):
    data = tmp_path / "d.npz"
    np.savez(data, **arrays)
    _one_line_exit_2(_invoke("scan", SAMPLES / "clean_op13.onnx", "--data", data, "--samples", "2"), message)


def test_external_data_location_with_a_nul_byte_is_refused(tmp_path):
    model = onnx.load(SAMPLES / "clean_op13.onnx")
    tensor = model.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "weights\x00.bin"
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="not a usable file name|not a plain relative path"):
        load_model(path)


def test_outputs_never_overwrite_a_models_external_data(tmp_path):
    import shutil

    for name in ("badnets_op18.onnx", "badnets_op18.onnx.data"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    before = (tmp_path / "badnets_op18.onnx.data").read_bytes()
    for command in (["scan"], ["repair", "--epochs", "0"]):
        result = _invoke(*command, tmp_path / "badnets_op18.onnx", "--data", SAMPLES / "defender.npz",
                         "-o", tmp_path / "badnets_op18.onnx.data")
        _one_line_exit_2(result, "refusing to overwrite")
    assert (tmp_path / "badnets_op18.onnx.data").read_bytes() == before


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.json"

    def interrupted(_fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"{}" * 1000)
    assert list(tmp_path.iterdir()) == []


def test_a_write_into_a_file_as_folder_is_an_output_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        write_atomic(blocker / "out.json", b"{}")


def test_sigterm_ends_a_scan_with_143_and_no_output(tmp_path):
    out = tmp_path / "report.json"
    command = [sys.executable, "-c", "from fmt_audit_cli.main import main; main()", "scan",
               str(SAMPLES / "badnets_op13.onnx"), "--data", str(SAMPLES / "defender.npz"), "--preset", "gradient",
               "-o", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)   # imports done, testing under way (a full gradient scan of the sample takes longer)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "terminated" and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_data_folder_that_cannot_be_listed(tmp_path):
    from fmt_audit.data import load_image_folder

    broken = tmp_path / "root"
    broken.symlink_to(tmp_path / "nowhere")
    with pytest.raises(DataError, match="cannot read the image folder"):
        load_image_folder(broken, 1, (16, 16))


def test_names_that_are_not_utf8_are_a_load_error(tmp_path):
    model = onnx.load(SAMPLES / "clean_op13.onnx")
    model.producer_name = "fmt-audit-marker"
    payload = model.SerializeToString().replace(b"fmt-audit-marker", b"\x80mt-audit-marker")
    path = tmp_path / "m.onnx"
    path.write_bytes(payload)
    _one_line_exit_2(_invoke("inspect", path), "is not UTF-8 text")
