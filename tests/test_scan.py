import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SAMPLES
from fmt_audit_cli.main import main

from fmt_audit.bridge import to_torch
from fmt_audit.data import load_data
from fmt_audit.errors import ConfigError
from fmt_audit.loading import load_model
from fmt_audit.runtime import create_session
from fmt_audit.scan import ScanConfig, scan
from fmt_audit.selection import select_kmeans, select_outliers
from fmt_audit.testing import random_start

N = 48


@pytest.fixture(scope="module")
def badnets_report():
    return scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz", ScanConfig(samples=N, seed=5))


def _slow_scores(model_path, layer_name, channel, config):
    """The published per-channel loop, written independently: full forward, one grad, ORT accuracy."""
    loaded = load_model(model_path)
    data = load_data(SAMPLES / "defender.npz", loaded.image_input, 10).take(config.samples, seed=config.seed)
    bridge = to_torch(loaded.proto)
    captured = {}
    handle = bridge.conv_modules[layer_name].register_forward_hook(lambda m, i, o: captured.__setitem__("f", o))
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        bridge.module(x)
    clean = captured["f"][:, channel].clone()
    x0 = torch.from_numpy(random_start(data.x, config.alpha, config.seed)).requires_grad_(True)
    bridge.module(x0)
    loss = torch.nn.functional.mse_loss(captured["f"][:, channel], clean)
    (grad,) = torch.autograd.grad(loss, x0)
    handle.remove()
    session = create_session(loaded.proto, "cpu")
    scores = []
    for size in (config.alpha, 2 * config.alpha):
        candidate = x0.detach() + size * grad.sign()
        candidate = torch.clamp(torch.minimum(torch.maximum(candidate, x - config.eps), x + config.eps), 0, 1)
        predictions = session.run({"input": candidate.numpy()})[0].argmax(1)
        scores.append(float((predictions == data.y).mean()))
    return scores


@pytest.mark.parametrize(("layer_index", "channel"), [(0, 3), (3, 11), (5, 30)])
def test_report_matches_a_direct_slow_computation(badnets_report, layer_index, channel):
    layer = badnets_report.layers[layer_index]
    expected = _slow_scores(SAMPLES / "badnets_op13.onnx", layer.name, channel, ScanConfig(samples=N, seed=5))
    assert layer.scores[channel] == pytest.approx(expected, abs=1.01 / N)


def test_report_structure(badnets_report):
    report = badnets_report.to_dict()
    assert report["model"]["opset"] == 13 and report["model"]["input"]["name"] == "input"
    assert report["config"]["mode"] == "gradient" and report["config"]["samples"] == N
    layers = report["layers"]
    assert [layer["name"] for layer in layers] == [layer.name for layer in load_model(
        SAMPLES / "badnets_op13.onnx").layers]
    for layer in layers:
        assert len(layer["scores"]) == layer["channels"]
        assert all(len(pair) == 2 and all(0 <= v <= 1 for v in pair) for pair in layer["scores"])
        assert all(0 <= c < layer["channels"] for c in layer["flagged"])
    assert report["summary"]["channels_tested"] == 144
    assert report["summary"]["flagged"] == sum(len(layer["flagged"]) for layer in layers)
    assert 0.9 <= report["summary"]["clean_accuracy"] <= 1.0


def test_same_seed_same_report(badnets_report):
    again = scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz", ScanConfig(samples=N, seed=5))
    first, second = badnets_report.to_dict(), again.to_dict()
    first.pop("timing"), second.pop("timing")
    assert first == second


def test_exporters_give_the_same_scores():
    """The legacy (opset 13) and dynamo (opset 18) exports of one model score alike."""
    config = ScanConfig(samples=32, seed=1)
    a = scan(SAMPLES / "clean_op13.onnx", SAMPLES / "defender.npz", config)
    b = scan(SAMPLES / "clean_op18.onnx", SAMPLES / "defender.npz", config)
    # the exporters fold BatchNorm with different rounding: a gradient sign may flip on a pixel, so
    # allow one image's difference per channel, and require near-identical scores overall
    diff = np.abs(np.concatenate([np.array(x.scores) - np.array(y.scores) for x, y in zip(a.layers, b.layers)]))
    assert len(a.layers) == len(b.layers) == 6
    assert diff.max() <= 1 / 32 + 1e-9 and diff.mean() < 0.01


def test_outlier_rule_flags_fewer_on_clean_than_badnets(badnets_report):
    clean = scan(SAMPLES / "clean_op13.onnx", SAMPLES / "defender.npz", ScanConfig(samples=N, seed=5))
    assert clean.flagged_count < badnets_report.flagged_count


def test_skip_layers_and_config_validation():
    report = scan(SAMPLES / "clean_op13.onnx", SAMPLES / "defender.npz",
                  ScanConfig(samples=8, skip_layers="block"))
    assert [layer.name for layer in report.layers] == ["/stem/stem.0/Conv"]
    assert len(report.skipped_layers) == 5
    with pytest.raises(ConfigError, match="skips every Conv"):
        scan(SAMPLES / "clean_op13.onnx", SAMPLES / "defender.npz", ScanConfig(samples=8, skip_layers="."))
    for bad in ({"eps": 0}, {"alpha": 0.5}, {"samples": 0}, {"selection": "x"}, {"skip_layers": "("}):
        with pytest.raises(ConfigError):
            ScanConfig(**bad)


def test_kmeans_flags_the_smaller_cluster():
    scores = np.array([[0.9, 0.9]] * 6 + [[0.2, 0.1]] * 2)
    assert select_kmeans(scores).flagged == [6, 7]


def test_outlier_rule_flags_nothing_without_outliers():
    rng = np.random.default_rng(0)
    scores = 0.8 + 0.02 * rng.standard_normal((32, 2))
    assert select_outliers(scores).flagged == []
    scores[[4, 9]] = 0.2
    assert select_outliers(scores).flagged == [4, 9]


def test_outlier_rule_ignores_sampling_noise_when_most_channels_tie():
    scores = np.ones((16, 2))
    scores[3] = 1 - 1 / 48          # one image of 48 changed: noise
    assert select_outliers(scores, samples=48).flagged == []
    scores[7] = 0.5                 # half the batch misclassified: an outlier
    assert select_outliers(scores, samples=48).flagged == [7]


def test_degenerate_layer_is_reported_not_flagged():
    scores = np.full((10, 2), 0.75)
    for selection in (select_kmeans(scores), select_outliers(scores)):
        assert selection.flagged == [] and selection.degenerate


def test_cli_scan_writes_report_and_refuses_overwrite(tmp_path):
    out = tmp_path / "report.json"
    args = ["scan", str(SAMPLES / "clean_op13.onnx"), "--data", str(SAMPLES / "defender.npz"), "--samples", "8"]
    result = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "channels flagged" in result.output
    assert json.loads(out.read_text())["summary"]["channels_tested"] == 144
    assert not list(tmp_path.glob(".*.tmp"))
    refused = CliRunner().invoke(main, [*args, "-o", str(SAMPLES / "defender.npz")])
    assert refused.exit_code == 2 and "refusing to overwrite" in refused.output


@pytest.mark.parametrize(("extra", "message"), [
    (["--eps", "0"], "--eps must be"),
    (["--mean", "0.5,0.5", "--std", "0.5,0.5"], "1 or 1 values"),
    (["--mean", "0.5"], "go together"),
    (["-o", "/no/such/folder/r.json"], "output folder does not exist"),
])
def test_cli_scan_bad_options_exit_2(extra, message):
    args = ["scan", str(SAMPLES / "clean_op13.onnx"), "--data", str(SAMPLES / "defender.npz"), "--samples", "4"]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1


def test_cli_scan_bad_data_exit_2(tmp_path):
    bad = tmp_path / "d.npz"
    np.savez(bad, x=np.zeros((2, 8, 8), np.uint8), y=np.zeros(2, np.int64))
    result = CliRunner().invoke(main, ["scan", str(SAMPLES / "clean_op13.onnx"), "--data", str(bad)])
    assert result.exit_code == 2 and "differ" in result.output
