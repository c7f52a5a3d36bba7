"""The other defenses through the repair pipeline (``repair --method ft|fp|clp``) and ``compare``."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import MANIFEST, SAMPLES, build_synthetic, save
from fmt_audit_cli.main import main
from onnx import helper, numpy_helper

from fmt_audit.backends.torch.bridge import BridgedClassifier, to_torch
from fmt_audit.data import Preprocessing, load_npz
from fmt_audit.errors import ConfigError
from fmt_audit.model.graph import conv_layers, last_conv_layers, with_node_names
from fmt_audit.model.loading import load_model
from fmt_audit.repair.comparison import compare
from fmt_audit.repair.config import FineTuneConfig
from fmt_audit.repair.evaluation import defense_effectiveness, evaluate
from fmt_audit.repair.pipeline import RepairConfig, nonzero_removed, repair
from fmt_audit.repair.pruning import clp_channels, dormant_channels, lipschitz_bounds, mean_activations
from fmt_audit.report.schema import SCHEMA_VERSION, problems

BADNETS = SAMPLES / "badnets_op13.onnx"
TARGET = next(m["target"] for m in MANIFEST["models"] if m["file"] == "badnets_op13.onnx")


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_lipschitz_bounds_are_kernel_spectral_norms_times_the_batchnorm_scale():
    model = build_synthetic()
    layers = conv_layers(with_node_names(model))
    bounds = lipschitz_bounds(model, layers)
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weight = tensors["conv1.w"].astype(np.float64)
    scale = np.abs(tensors["bn.scale"]) / np.sqrt(tensors["bn.var"] + 1e-5)
    expected = [np.linalg.norm(weight[c].reshape(3, 9), ord=2) * scale[c] for c in range(4)]
    assert np.allclose(bounds["conv1"], expected)
    # depthwise: one input channel per filter, so the bound is the kernel's L2 norm
    depthwise = next(layer for layer in layers if layer.depthwise)
    assert np.allclose(bounds[depthwise.name], np.linalg.norm(tensors["dw.w"].reshape(4, -1), axis=1))


def test_clp_flags_the_one_channel_whose_kernel_was_blown_up():
    model = onnx.load(str(BADNETS))
    layers = load_model(BADNETS).layers
    layer = layers[1]
    weight = next(t for t in model.graph.initializer if t.name == layer.weight)
    value = numpy_helper.to_array(weight).copy()
    channel = 5
    value[channel] *= 50
    weight.CopyFrom(numpy_helper.from_array(value, weight.name))
    choice = clp_channels(model, layers, u=3.0)
    assert choice.channels.get(layer.name) == [channel]
    assert choice.evidence["layers"][layer.name]["max"] > choice.evidence["layers"][layer.name]["threshold"]
    assert clp_channels(model, layers, u=1e6).channels == {}


def test_last_conv_layers_of_the_sample_resnet_are_the_last_blocks_two_branches():
    loaded = load_model(BADNETS)
    assert [layer.name for layer in last_conv_layers(loaded.proto, loaded.layers)] == [
        "/block2/conv2/Conv", "/block2/shortcut/shortcut.0/Conv"]


def test_fine_pruning_prunes_the_least_active_channels_within_the_accuracy_budget():
    loaded = load_model(BADNETS)
    data = load_npz(SAMPLES / "defender.npz")
    classifier = BridgedClassifier(to_torch(loaded.proto), Preprocessing())
    choice = dormant_channels(classifier, loaded.proto, loaded.layers, data, max_drop=0.05)
    names = choice.evidence["layers"]
    assert names == ["/block2/conv2/Conv", "/block2/shortcut/shortcut.0/Conv"]
    activation = mean_activations(classifier, names, data)
    pruned = choice.channels[names[0]]
    assert choice.channels[names[1]] == pruned and 0 < len(pruned) < 32
    kept = np.setdiff1d(np.arange(32), pruned)
    assert activation[pruned].max() <= activation[kept].min()
    trace = choice.evidence["trace"]
    base = choice.evidence["accuracy_unpruned"]
    within = [t for t in trace if t["pruned"] <= len(pruned)]
    assert all(t["accuracy"] >= base - 0.05 for t in within)
    assert trace[-1]["pruned"] == 31 or trace[-1]["accuracy"] < base - 0.05


@pytest.mark.parametrize("method", ["ft", "fp", "clp"])
def test_each_method_repairs_through_the_same_write_back_and_verification(method):
    config = RepairConfig(FineTuneConfig(epochs=1), method=method)
    result = repair(BADNETS, SAMPLES / "defender.npz", config)
    report = result.report
    assert report.method == method == report.config["method"]
    assert report.verification["checker"] == "passed"
    assert nonzero_removed(result.model, report.flagged) == []
    assert report.config["unlearning"]["enabled"] is False
    if method == "ft":
        assert report.flagged == {} and len(report.epochs) == 1
    if method == "fp":
        assert report.flagged and report.evidence["trace"] and len(report.epochs) == 1
    if method == "clp":
        assert report.epochs == [] and report.config["epochs"] == 0 and report.evidence["u"] == 3.0
    assert report.accuracy["after"] is not None


def test_clp_runs_without_data_and_other_methods_refuse():
    result = repair(BADNETS, None, RepairConfig(method="clp"))
    assert result.report.data["images"] == 0 and result.report.accuracy["before"] is None
    assert result.report.verification["images"] == 16
    with pytest.raises(ConfigError, match="needs clean labelled data"):
        repair(BADNETS, None, RepairConfig(method="fp"))
    with pytest.raises(ConfigError, match="go with --method fmt"):
        repair(BADNETS, SAMPLES / "defender.npz", RepairConfig(method="ft"), flagged={})
    with pytest.raises(ConfigError, match="--method"):
        RepairConfig(method="nc")
    with pytest.raises(ConfigError, match="--prune-drop"):
        RepairConfig(prune_drop=0)
    with pytest.raises(ConfigError, match="--clp-u"):
        RepairConfig(clp_u=-1)


def test_cli_clp_without_data(tmp_path):
    result = _invoke("repair", BADNETS, "--method", "clp", "-o", tmp_path / "clp.onnx", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "clp is data-free" in result.output and "accuracy not measured" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["method"] == "clp" and report["flagged"]["evidence"]["u"] == 3.0
    onnx.checker.check_model(str(tmp_path / "clp.onnx"))
    refused = _invoke("repair", BADNETS, "--method", "fp", "-o", tmp_path / "fp.onnx")
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "--data" in refused.output


def test_compare_measures_every_method_against_the_model_before():
    comparison = compare(BADNETS, SAMPLES / "defender.npz", SAMPLES / "test.npz", SAMPLES / "badnets_test.npz",
                         TARGET, methods=["ft", "clp"], config=RepairConfig(FineTuneConfig(epochs=1)))
    before = evaluate(BADNETS, SAMPLES / "test.npz", SAMPLES / "badnets_test.npz", TARGET).metrics
    assert comparison.baseline == before
    assert [o.method for o in comparison.outcomes] == ["ft", "clp"]
    for outcome in comparison.outcomes:
        assert outcome.error is None and outcome.repair.method == outcome.method
        assert outcome.der == pytest.approx(defense_effectiveness(before, outcome.metrics))
    table = comparison.format_text()
    assert table.splitlines()[1].startswith("none") and "clp" in table
    with pytest.raises(ConfigError, match="--methods"):
        compare(BADNETS, SAMPLES / "defender.npz", SAMPLES / "test.npz", methods=["fmt", "nc"])


def test_compare_records_a_method_that_cannot_run_and_goes_on(tmp_path):
    """CLP needs stored Conv weights; with every weight computed it fails, the table says why."""
    model = onnx.load(str(BADNETS))
    for node in list(model.graph.node):
        if node.op_type == "Conv":
            computed = f"{node.input[1]}_computed"
            model.graph.node.insert(0, helper.make_node("Identity", [node.input[1]], [computed]))
            node.input[1] = computed
    path = save(model, tmp_path / "computed.onnx")
    comparison = compare(path, SAMPLES / "defender.npz", SAMPLES / "test.npz", methods=["clp"])
    assert comparison.outcomes[0].error and comparison.outcomes[0].metrics is None
    assert "failed" in comparison.format_text()


def test_cli_compare_table_json_and_saved_models(tmp_path):
    result = _invoke("compare", BADNETS, "--data", SAMPLES / "defender.npz", "--test", SAMPLES / "test.npz",
                     "--poisoned", SAMPLES / "badnets_test.npz", "--target", TARGET, "--methods", "clp,ft",
                     "--epochs", 1, "--json", tmp_path / "c.json", "-o", tmp_path / "models")
    assert result.exit_code == 0, result.output
    assert "DER" in result.output and "clp" in result.output
    saved = json.loads((tmp_path / "c.json").read_text())
    assert [m["method"] for m in saved["methods"]] == ["clp", "ft"]
    assert saved["baseline"]["asr"] == pytest.approx(1.0)
    assert (saved["schema_version"], saved["kind"], problems(saved)) == (SCHEMA_VERSION, "comparison", [])
    for name in ("clp", "ft"):
        onnx.checker.check_model(str(tmp_path / "models" / f"{name}.onnx"))
    bad = _invoke("compare", BADNETS, "--data", SAMPLES / "defender.npz", "--test", SAMPLES / "test.npz",
                  "--methods", "fmt,nc")
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1


def test_the_repair_methods_are_a_registry_of_one_file_each_that_the_cli_and_compare_offer():
    from pathlib import Path

    from fmt_audit.repair.methods import registry
    from fmt_audit.repair.methods.base import RepairMethod

    folder = Path(registry.__file__).parent
    for name, method in registry.METHODS.items():
        assert isinstance(method, RepairMethod) and method.name == name and method.summary
        assert type(method).__module__ == f"fmt_audit.repair.methods.{name}" and (folder / f"{name}.py").is_file()
        assert method.fine_tunes or method.without_fine_tuning      # the text summary says why it did not
    assert registry.DEFAULT == next(iter(registry.METHODS)) == "fmt"
    assert registry.COMPARED == tuple(n for n, m in registry.METHODS.items() if m.compared)
    assert "anp" not in registry.COMPARED
    help_text = _invoke("repair", "--help").output
    for name, method in registry.METHODS.items():
        assert f"{name}: {method.summary.split(' (')[0]}" in " ".join(help_text.split())
    result = _invoke("repair", BADNETS, "--method", "nope", "--data", SAMPLES / "defender.npz")
    assert result.exit_code == 2 and all(name in result.output for name in registry.METHODS)
