"""``--device`` decided once (issue 30): ONNX Runtime's and torch's devices named apart, used by every stage."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import QUICK_MARGIN_ARGS, SAMPLES
from fmt_audit_cli.main import main

import fmt_audit.backends.onnxrt.session as session
from fmt_audit.backends.device import Placement, resolve_device
from fmt_audit.errors import DeviceError


def test_auto_names_each_backends_own_device(monkeypatch):
    monkeypatch.setattr(session, "cuda_available", lambda: False)      # the CPU build of ONNX Runtime ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # ... beside a CUDA torch
    assert resolve_device("auto") == Placement("auto", "cpu", None)    # torch not decided until needed
    assert resolve_device("auto", torch_needed=True) == Placement("auto", "cpu", "cuda")
    assert resolve_device("auto").with_torch().memory_device("gradient") == "cuda"
    assert resolve_device("auto").memory_device("gradient") == "cpu"    # no torch: ONNX Runtime's arrays
    assert resolve_device("cpu", torch_needed=True) == Placement("cpu", "cpu", "cpu")


def test_cuda_is_refused_at_once_where_torch_has_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cuda") == Placement("cuda", "cuda", None)     # ONNX Runtime refuses it at its session
    with pytest.raises(DeviceError, match="CUDA was requested but PyTorch sees no usable GPU"):
        resolve_device("cuda", torch_needed=True)
    with pytest.raises(DeviceError, match="--device must be one of auto, cpu, cuda; got 'gpu'"):
        resolve_device("gpu")


def test_reports_name_where_each_stage_ran(tmp_path):
    model, data = str(SAMPLES / "badnets_op13.onnx"), str(SAMPLES / "defender.npz")
    common = ["--data", data, "--samples", "16", "--skip-layers", "block", "--device", "cpu"]
    masked = CliRunner().invoke(main, ["scan", model, *common, "--verdict", "none", "--json", str(tmp_path / "m.json")])
    assert masked.exit_code == 0, masked.output
    placement = json.loads((tmp_path / "m.json").read_text())["config"]["placement"]
    assert placement == {"requested": "cpu", "onnxruntime": "cpu", "torch": None,      # no torch was needed
                         "torch_memory_format": None}
    verdict = CliRunner().invoke(main, ["scan", model, *common, *QUICK_MARGIN_ARGS, "--json", str(tmp_path / "v.json")])
    assert verdict.exit_code == 0, verdict.output
    placement = json.loads((tmp_path / "v.json").read_text())["config"]["placement"]
    assert placement["torch"] == "cpu" and placement["torch_memory_format"] == "channels_last"  # the verdict's
    repaired = CliRunner().invoke(main, ["repair", model, *common, "--epochs", "0", "--verdict", "none",
                                         "-o", str(tmp_path / "r.onnx"),
                                         "--json", str(tmp_path / "r.json")])
    assert repaired.exit_code == 0, repaired.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["placement"] == {"requested": "cpu", "onnxruntime": "cpu", "torch": "cpu",
                                             "torch_memory_format": "channels_last"}
    assert report["verification"]["ort_device"] == "cpu"
