"""Untrusted inputs and interrupted runs: one-line errors (exit 2), no traceback, no partial output."""

import json
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
from conftest import QUICK_MARGIN_ARGS, SAMPLES
from fmt_audit_cli.main import main
from onnx import numpy_helper

from fmt_audit.errors import DataError, ModelLoadError, OutputError
from fmt_audit.model.loading import load_model
from fmt_audit.model.outputs import write_atomic


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
                      "--json", tmp_path / "r.json", *QUICK_MARGIN_ARGS)
    assert scanned.exit_code == 0 and "warning: NaN or Inf in 1 weight tensor" in scanned.output
    assert '"nonfinite_weights": [' in (tmp_path / "r.json").read_text()
    refused = _invoke("repair", path, "--data", SAMPLES / "defender.npz", "-o", tmp_path / "out.onnx")
    _one_line_exit_2(refused, "repair refused")
    assert not (tmp_path / "out.onnx").exists()


def test_multi_line_messages_reach_the_user_as_one_line(monkeypatch):
    import fmt_audit.model.inspection

    def broken(model):
        raise ModelLoadError("first line of the story\nsecond line\nthird")

    monkeypatch.setattr(fmt_audit.model.inspection, "summarize", broken)
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
    for command, output in ((["scan"], "--json"), (["repair", "--epochs", "0"], "-o")):
        result = _invoke(*command, tmp_path / "badnets_op18.onnx", "--data", SAMPLES / "defender.npz",
                         output, tmp_path / "badnets_op18.onnx.data")
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
               "--json", str(out)]
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


def _fixed_batch_export(path: Path, flatten_all: bool = False) -> Path:
    """torch's legacy exporter with a fixed input shape folds the batch size into the Reshape target
    (``view(x.size(0), -1)`` -> ``Reshape [1, -1]``). ``flatten_all``: ``view(-1)[None]`` instead, which
    flattens the whole batch into one row, so no Reshape target names the batch."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Linear(4 * 16 * 16, 10)

        def forward(self, x):
            features = torch.relu(self.conv(x))
            return self.fc(features.view(-1)[None] if flatten_all else features.view(x.size(0), -1))

    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), torch.zeros(1, 1, 16, 16), str(path), input_names=["input"],
                      output_names=["logits"], opset_version=13, dynamo=False)
    return path


def test_a_graph_fixed_to_batch_1_scans_and_repairs(tmp_path):
    path = _fixed_batch_export(tmp_path / "fixed.onnx")
    assert load_model(path).image_input.batch == 1
    for mode in ("mask", "gradient"):   # ONNX Runtime is fed batches of 1
        result = _invoke("scan", path, "--data", SAMPLES / "defender.npz", "--samples", "8", "--mode", mode,
                         *QUICK_MARGIN_ARGS)
        assert result.exit_code == 0, result.output
    # the bridge frees the batch in its copy (Reshape [1, -1] -> [0, -1]) to fine-tune in batches
    out = tmp_path / "out.onnx"
    repaired = _invoke("repair", path, "--data", SAMPLES / "defender.npz", "-o", out, "--samples", "8",
                       "--epochs", "1", "--verdict", "none")
    assert repaired.exit_code == 0, repaired.output
    written = onnx.load(out)
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1    # the output keeps batch 1
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in onnx.load(path).graph.node]


def test_a_fixed_batch_graph_that_mixes_its_images_refuses_fine_tuning_in_one_line(tmp_path):
    path = _fixed_batch_export(tmp_path / "fixed.onnx", flatten_all=True)
    refused = _invoke("repair", path, "--data", SAMPLES / "defender.npz", "-o", tmp_path / "out.onnx")
    _one_line_exit_2(refused, "fixed to batch size 1")


def test_absurd_declared_dimensions_are_one_line_errors(tmp_path):
    for dims, message in (([1, 1, 2**40, 16], "height differ"), ([0, 1, 16, 16], "expected positive sizes"),
                          ([10**6, 1, 16, 16], "fixed batch of 1000000")):
        model = onnx.load(SAMPLES / "clean_op13.onnx")
        for dim, size in zip(model.graph.input[0].type.tensor_type.shape.dim, dims):
            dim.Clear()
            dim.dim_value = size
        path = tmp_path / "m.onnx"
        path.write_bytes(model.SerializeToString())
        _one_line_exit_2(_invoke("scan", path, "--data", SAMPLES / "defender.npz", "--samples", "2"), message)


def test_computed_conv_weights_scan_in_mask_mode_and_fail_in_one_line_elsewhere(tmp_path):
    from onnx import helper

    model = onnx.load(SAMPLES / "clean_op13.onnx")
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    model.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32), "one"))
    model.graph.node.insert(0, helper.make_node("Mul", [conv.input[1], "one"], ["computed_weight"], name="scale"))
    conv.input[1] = "computed_weight"
    path = tmp_path / "computed.onnx"
    onnx.save(model, path)
    data = ["--data", SAMPLES / "defender.npz"]
    assert _invoke("scan", path, *data, "--samples", "4", "--skip-layers", "block", *QUICK_MARGIN_ARGS).exit_code == 0
    _one_line_exit_2(_invoke("scan", path, *data, "--samples", "4", "--mode", "gradient"),
                     "compute their weights from other nodes")
    _one_line_exit_2(_invoke("repair", path, *data, "-o", tmp_path / "out.onnx"), "compute their weights")


@pytest.mark.slow
def test_models_past_the_protobuf_limit_go_through_files_with_external_data(tmp_path, monkeypatch):
    """Every path a model of 2 GiB or more takes (checker on a file, ORT from a file, shape inference on a
    skeleton, output as model + .data), exercised on the sample by lowering the limit."""
    import hashlib
    import json

    import fmt_audit.model.graph

    monkeypatch.setattr(fmt_audit.model.graph, "PROTOBUF_LIMIT", 1000)
    out, report = tmp_path / "repaired.onnx", tmp_path / "repair.json"
    result = _invoke("repair", SAMPLES / "badnets_op13.onnx", "--data", SAMPLES / "defender.npz", "--epochs", "1",
                     "--samples", "32", "--no-unlearn", "--verdict", "none", "-o", out, "--json", report)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repair.json", "repaired.onnx", "repaired.onnx.data"]
    assert out.stat().st_size < 10_000 < (tmp_path / "repaired.onnx.data").stat().st_size
    saved = json.loads(report.read_text())["output"]
    assert saved["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    repaired = load_model(out)
    assert repaired.external_data == ("repaired.onnx.data",)
    scanned = _invoke("scan", out, "--data", SAMPLES / "defender.npz", "--samples", "8", "--mode", "gradient",
                      "--steps", "1", "--eps", "0.1", *QUICK_MARGIN_ARGS)
    assert scanned.exit_code == 0, scanned.output
    # a small model written over it takes its data file along; an unrelated file of that name stays
    monkeypatch.setattr(fmt_audit.model.graph, "PROTOBUF_LIMIT", 2**31)
    from fmt_audit.model.outputs import write_model

    write_model(out, onnx.load(SAMPLES / "clean_op13.onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repair.json", "repaired.onnx"]
    (tmp_path / "repaired.onnx.data").write_bytes(b"not ours")
    write_model(out, onnx.load(SAMPLES / "clean_op13.onnx"))
    assert (tmp_path / "repaired.onnx.data").read_bytes() == b"not ours"


@pytest.mark.parametrize("damage", ["cycle", "missing initializer", "duplicate output name"])
def test_broken_graphs_are_one_line_errors(tmp_path, damage):
    model = onnx.load(SAMPLES / "clean_op13.onnx")
    nodes = model.graph.node
    if damage == "cycle":          # the first node reads the output of the last
        nodes[0].input[0] = nodes[-1].output[0]
    elif damage == "missing initializer":
        model.graph.initializer.remove(model.graph.initializer[0])
    else:                          # two nodes produce one value
        nodes[1].output[0] = nodes[0].output[0]
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    for command in (["inspect", path], ["scan", path, "--data", SAMPLES / "defender.npz"]):
        _one_line_exit_2(_invoke(*command), "fails the ONNX checker")


@pytest.mark.parametrize("damage", [{"scores": "abc"}, {"scores": [["x", 1]]}, {"flagged": [None]}, {"shift": 3}])
def test_malformed_scan_reports_are_data_errors(damage):
    from fmt_audit.report.json_report import ScanReport

    layer = {"name": "conv", "channels": 2, "depthwise": False, "scores": [[1, 1], [1, 1]],
             "shift": [[0, 0], [0, 0]], "flagged": [], "selection": {}}
    saved = {"model": {"sha256": "0"}, "config": {}, "summary": {"clean_accuracy": 1.0},
             "layers": [{**layer, **damage}]}
    with pytest.raises(DataError, match="not an fmt-audit scan report"):
        ScanReport.from_dict(saved)


def test_write_back_keeps_identity_copies_of_a_changed_tensor():
    """Conv B's bias is an Identity of Conv A's stored bias: training A alone must not move B."""
    import torch
    from onnx import helper

    from fmt_audit.backends.onnxrt.session import OrtClassifier
    from fmt_audit.backends.torch.bridge import to_torch, write_back

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w1", (4, 1, 3, 3)), ("b", (4,)), ("w2", (4, 4, 3, 3)), ("fc", (10, 4 * 16 * 16)))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Identity", ["b"], ["b_copy"], name="copy"),
             helper.make_node("Conv", ["c1", "w2", "b_copy"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c2"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", 1, ["n", 1, 16, 16])],
                              [helper.make_tensor_value_info("logits", 1, ["n", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    bridge = to_torch(model)
    with torch.no_grad():
        bridge.conv_weights("conv1").bias += 5.0
    updated = write_back(model, bridge)
    x = np.random.default_rng(1).random((4, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = bridge.module(torch.from_numpy(x)).numpy()
    assert np.abs(OrtClassifier(updated, "cpu").logits(x) - expected).max() <= 1e-3 * np.abs(expected).max()


@pytest.mark.parametrize(("content", "message"), [
    ("scan = 1\n", "scan must be a table"),
    ("[scan]\nsamples = {a = 1}\n", "samples must be a whole number"),
    ("seed = 1979-05-27\n", "seed must be a whole number"),
    ("[scan]\nsamples = 64.7\n", "samples must be a whole number; got 64.7"),
    ("[scan]\nsamples = true\n", "samples must be a whole number; got true"),
    ("[scan]\nfail-on-suspicious = 1\n", "fail-on-suspicious must be true or false"),
    ("[scan]\ngain = \"x\"\n", "gain must be a number"),
    ("sampels = 64\n", "no command has an option 'sampels'"),
    ("[scan]\njson-path = \"r.json\"\n", "has no option 'json-path'"),
    ("[scan]\nseed = -1\n", "--seed must be a whole number in 0..4294967295; got -1"),
    ("json = 1\n", "json must be a string; got 1"),
    ("[scan]\ndata = 5\n", "data must be a string; got 5"),
    ("sample = 64\n", "did you mean 'samples'?"),
    ("layers = true\n", "no command has an option 'layers'"),      # inspect's: it reads no config file
])
def test_config_values_of_the_wrong_shape_exit_2(tmp_path, content, message):
    config = tmp_path / "c.toml"
    config.write_text(content)
    result = _invoke("scan", SAMPLES / "clean_op13.onnx", "--data", SAMPLES / "defender.npz", "--config", config)
    _one_line_exit_2(result, message)


def test_config_keys_are_the_long_option_names(tmp_path):
    """``json`` for --json, ``output`` for -o/--output; a key only other commands have (epochs) is theirs."""
    config, report = tmp_path / "c.toml", tmp_path / "r.json"
    config.write_text(f'epochs = 3\n[scan]\njson = "{report}"\nsamples = 16\nskip-layers = "block"\n'
                      'verdict = "none"\n')
    result = _invoke("scan", SAMPLES / "clean_op13.onnx", "--data", SAMPLES / "defender.npz", "--config", config)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["config"]["samples"] == 16


@pytest.mark.parametrize("command", ["scan", "repair", "evaluate"])
def test_no_output_overwrites_the_config_file(tmp_path, command):
    config = tmp_path / "c.toml"
    config.write_text("device = \"cpu\"\n")
    before = config.read_bytes()
    given = {"scan": ["--json", config], "repair": ["-o", tmp_path / "r.onnx", "--json", config],
             "evaluate": ["--json", config]}[command]
    result = _invoke(command, SAMPLES / "clean_op13.onnx", "--data", SAMPLES / "defender.npz", "--config", config,
                     *given)
    _one_line_exit_2(result, "refusing to overwrite the input file")
    assert config.read_bytes() == before


@pytest.mark.parametrize("outputs", [["--json", "same", "--html", "same"], ["--json", "r.onnx"],
                                     ["--json", "r.onnx.data"]])
def test_two_outputs_of_one_command_cannot_share_a_path(tmp_path, outputs):
    """Refused before any work, whether or not the file exists yet."""
    command = ["scan"] if "same" in outputs else ["repair", "-o", tmp_path / "r.onnx"]
    result = _invoke(*command, SAMPLES / "clean_op13.onnx", "--data", SAMPLES / "defender.npz",
                     *[tmp_path / a if a in ("same", "r.onnx", "r.onnx.data") else a for a in outputs])
    _one_line_exit_2(result, "name the same file")
    assert not list(tmp_path.iterdir())


def test_evaluate_never_overwrites_the_baselines_external_data(tmp_path):
    import shutil

    for name in ("badnets_op18.onnx", "badnets_op18.onnx.data"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    before = (tmp_path / "badnets_op18.onnx.data").read_bytes()
    result = _invoke("evaluate", SAMPLES / "clean_op13.onnx", "--data", SAMPLES / "test.npz", "--baseline",
                     tmp_path / "badnets_op18.onnx", "--json", tmp_path / "badnets_op18.onnx.data")
    _one_line_exit_2(result, "refusing to overwrite")
    assert (tmp_path / "badnets_op18.onnx.data").read_bytes() == before


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_seeds_out_of_range_exit_2(tmp_path, seed):
    for command in (["scan"], ["repair", "-o", tmp_path / "r.onnx"]):
        result = _invoke(*command, SAMPLES / "clean_op13.onnx", "--data", SAMPLES / "defender.npz", "--seed", seed)
        _one_line_exit_2(result, f"--seed must be a whole number in 0..4294967295; got {seed}")


def test_the_trace_is_refused_where_it_cannot_choose_the_channels(tmp_path):
    """As scan refuses --selection trace without the combined verdict, so does repair; and with a method that
    removes no given channels."""
    base = ["repair", SAMPLES / "clean_op13.onnx", "--data", SAMPLES / "defender.npz", "-o", tmp_path / "r.onnx",
            "--selection", "trace"]
    _one_line_exit_2(_invoke(*base, "--verdict", "none"), "give --verdict combined")
    _one_line_exit_2(_invoke(*base, "--method", "clp"), "--selection trace chooses the channels to remove")
    assert not list(tmp_path.iterdir())


def test_repair_checks_the_verdict_options_without_data(tmp_path):
    result = _invoke("repair", SAMPLES / "clean_op13.onnx", "--method", "clp", "-o", tmp_path / "r.onnx",
                     "--verdict-samples", "0")
    _one_line_exit_2(result, "--verdict-samples must be at least 1")


def test_a_failed_comparison_leaves_no_folder_it_made(tmp_path):
    (tmp_path / "kept").mkdir()     # there before: stays, empty or not
    for folder in (tmp_path / "made" / "sub", tmp_path / "kept" / "sub"):
        result = _invoke("compare", SAMPLES / "clean_op13.onnx", "--data", SAMPLES / "defender.npz", "--test",
                         SAMPLES / "test.npz", "--methods", "fmt,bogus", "-o", folder)
        _one_line_exit_2(result, "--methods takes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not list((tmp_path / "kept").iterdir())


def test_every_config_checks_its_seed():
    from fmt_audit.errors import ConfigError
    from fmt_audit.fmt.scan import ScanConfig
    from fmt_audit.repair.config import FineTuneConfig
    from fmt_audit.verdict import VerdictConfig

    for make in (ScanConfig, FineTuneConfig, VerdictConfig):
        with pytest.raises(ConfigError, match=r"--seed must be a whole number in 0..4294967295; got 4294967296"):
            make(seed=2**32)
        assert make(seed=2**32 - 1).seed == 2**32 - 1


def test_html_to_stdout_is_refused():
    result = _invoke("scan", SAMPLES / "clean_op13.onnx", "--data", SAMPLES / "defender.npz", "--html", "-")
    _one_line_exit_2(result, "--html needs a file path")


def test_graph_costs_stay_cheap_on_long_graphs():
    from onnx import helper

    from fmt_audit.fmt.memory import graph_cost

    nodes = [helper.make_node("Conv", ["input", "w"], ["v0"], name="conv", pads=[1, 1, 1, 1])]
    nodes += [helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"], name=f"relu{i}") for i in range(5000)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", 1, ["n", 1, 8, 8])],
                              [helper.make_tensor_value_info("v5000", 1, ["n", 2, 8, 8])],
                              [numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")])
    cost = graph_cost(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), 8, 8)
    assert cost.flops_to("relu4999") == cost.flops[0] == 2 * 2 * 8 * 8 * 9
    assert cost.retained_bytes("relu4999") == 5001 * 2 * 8 * 8 * 4


def test_cuda_requested_without_cuda_is_a_one_line_error():
    from fmt_audit.backends.onnxrt.session import cuda_available

    if cuda_available():
        pytest.skip("this machine has CUDA")
    for mode in ("mask", "gradient"):
        result = _invoke("scan", SAMPLES / "clean_op13.onnx", "--data", SAMPLES / "defender.npz", "--samples", "4",
                         "--mode", mode, "--device", "cuda")
        _one_line_exit_2(result, "CUDA was requested")


def test_first_line_of_empty_and_long_messages():
    from fmt_audit.errors import first_line

    assert first_line(ValueError()) == "ValueError"
    assert first_line(RuntimeError("\n  \nfirst\nsecond")) == "first"
