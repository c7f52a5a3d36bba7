import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import QUICK_MARGIN_ARGS, QUICK_VERDICT, SAMPLES
from fmt_audit_cli.main import main

from fmt_audit.backends.onnxrt.session import create_session
from fmt_audit.backends.torch.bridge import to_torch
from fmt_audit.data import load_data
from fmt_audit.errors import ConfigError
from fmt_audit.fmt.gradient import random_start
from fmt_audit.fmt.scan import EPS_GRID, ScanConfig, scan
from fmt_audit.fmt.scores import prediction_scores
from fmt_audit.fmt.selection import select_kmeans, select_outliers
from fmt_audit.model.loading import load_model

N = 48
PAPER = ScanConfig.from_preset("paper", samples=N, seed=5)


@pytest.fixture(scope="module")
def badnets_report():
    return scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz", PAPER, verdict=QUICK_VERDICT)


def _slow_scores(model_path, layer_name, channel, config, steps=1):
    """The per-channel loop, written independently: full forward, one grad per step, ORT accuracy."""
    loaded = load_model(model_path)
    data = load_data(SAMPLES / "defender.npz", loaded.image_input, 10).take(config.samples, seed=config.seed)
    bridge = to_torch(loaded.proto)
    captured = {}
    handle = bridge.conv_modules[layer_name].register_forward_hook(lambda m, i, o: captured.__setitem__("f", o))
    x = torch.from_numpy(data.x)
    with torch.no_grad():
        bridge.module(x)
    clean = captured["f"][:, channel].clone()
    x0 = torch.from_numpy(random_start(data.x, config.alpha, config.seed))
    for step in range(steps):
        x0 = x0.detach().requires_grad_(True)
        bridge.module(x0)
        loss = torch.nn.functional.mse_loss(captured["f"][:, channel], clean)
        (grad,) = torch.autograd.grad(loss, x0)
        if step < steps - 1:
            x0 = torch.clamp(torch.minimum(torch.maximum(x0 + config.alpha * grad.sign(), x - config.eps),
                                           x + config.eps), 0, 1)
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
    expected = _slow_scores(SAMPLES / "badnets_op13.onnx", layer.name, channel, PAPER)
    assert layer.scores[channel] == pytest.approx(expected, abs=1.01 / N)


def test_iterated_steps_match_a_direct_slow_computation():
    config = ScanConfig.from_preset("gradient", eps=0.1, samples=N, seed=2, skip_layers="block2")
    report = scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz", config, verdict=QUICK_VERDICT)
    assert report.config["steps"] == 5 and report.config["alpha"] == pytest.approx(0.1 / 3)
    layer = report.layers[1]
    slow_config = ScanConfig.from_preset("gradient", eps=0.1, alpha=0.1 / 3, samples=N, seed=2)
    for channel in (2, 9):
        expected = _slow_scores(SAMPLES / "badnets_op13.onnx", layer.name, channel, slow_config, steps=5)
        assert layer.scores[channel] == pytest.approx(expected, abs=1.01 / N)


def test_report_structure(badnets_report):
    report = badnets_report.to_dict()
    assert report["model"]["opset"] == 13 and report["model"]["input"]["name"] == "input"
    assert report["config"]["mode"] == "gradient" and report["config"]["samples"] == N
    assert report["config"]["preset"] == "paper" and report["config"]["eps"] == 0.06
    layers = report["layers"]
    assert [layer["name"] for layer in layers] == [layer.name for layer in load_model(
        SAMPLES / "badnets_op13.onnx").layers]
    for layer in layers:
        assert len(layer["scores"]) == layer["channels"]
        assert all(len(pair) == 2 and all(0 <= v <= 1 for v in pair) for pair in layer["scores"])
        assert len(layer["shift"]) == layer["channels"]
        # an image pushed into a wrong class is an image the model got wrong
        assert all(s <= 1 - a + 1e-9 for pairs in zip(layer["shift"], layer["scores"]) for s, a in zip(*pairs))
        assert all(0 <= c < layer["channels"] for c in layer["flagged"])
    assert report["summary"]["channels_tested"] == 144
    assert report["summary"]["flagged"] == sum(len(layer["flagged"]) for layer in layers)
    assert 0.9 <= report["summary"]["clean_accuracy"] <= 1.0


def test_same_seed_same_report(badnets_report):
    again = scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz", PAPER, verdict=QUICK_VERDICT)
    first, second = badnets_report.to_dict(), again.to_dict()
    for key in ("timing", "resources"):
        first.pop(key), second.pop(key)
    assert first == second


def test_exporters_give_the_same_scores():
    """The legacy (opset 13) and dynamo (opset 18) exports of one model score alike."""
    config = ScanConfig.from_preset("paper", samples=32, seed=1)
    a = scan(SAMPLES / "clean_op13.onnx", SAMPLES / "defender.npz", config, verdict=QUICK_VERDICT)
    b = scan(SAMPLES / "clean_op18.onnx", SAMPLES / "defender.npz", config, verdict=QUICK_VERDICT)
    # the exporters fold BatchNorm with different rounding: a gradient sign may flip on a pixel, so
    # allow one image's difference per channel, and require near-identical scores overall
    diff = np.abs(np.concatenate([np.array(x.scores) - np.array(y.scores) for x, y in zip(a.layers, b.layers)]))
    assert len(a.layers) == len(b.layers) == 6
    assert diff.max() <= 1 / 32 + 1e-9 and diff.mean() < 0.01


def test_outlier_rule_flags_fewer_on_clean_than_badnets():
    config = ScanConfig.from_preset("paper", selection="outlier", samples=200, seed=5)
    clean = scan(SAMPLES / "clean_op13.onnx", SAMPLES / "defender.npz", config, verdict=QUICK_VERDICT)
    badnets = scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz", config, verdict=QUICK_VERDICT)
    assert clean.flagged_count < badnets.flagged_count


def test_skip_layers_and_config_validation():
    report = scan(SAMPLES / "clean_op13.onnx", SAMPLES / "defender.npz",
                  ScanConfig(samples=8, eps=0.06, skip_layers="block"), verdict=QUICK_VERDICT)
    assert [layer.name for layer in report.layers] == ["/stem/stem.0/Conv"]
    assert len(report.skipped_layers) == 5
    with pytest.raises(ConfigError, match="skips every Conv"):
        scan(SAMPLES / "clean_op13.onnx", SAMPLES / "defender.npz", ScanConfig(samples=8, skip_layers="."),
             verdict=QUICK_VERDICT)
    for bad in ({"eps": 0}, {"eps": 0.1, "alpha": 0.5}, {"samples": 0}, {"selection": "x"}, {"skip_layers": "("},
                {"mode": "x"}, {"steps": 0}, {"gain": 1.0}, {"score": "x"}, {"preset": "x"}):
        with pytest.raises(ConfigError):
            ScanConfig(**bad)


def test_kmeans_flags_the_smaller_cluster():
    suspicion = 1 - np.array([[0.9, 0.9]] * 6 + [[0.2, 0.1]] * 2)
    assert select_kmeans(suspicion).flagged == [6, 7]


def test_outlier_rule_flags_nothing_without_outliers():
    rng = np.random.default_rng(0)
    suspicion = 0.2 + 0.02 * rng.standard_normal((32, 2))
    assert select_outliers(suspicion).flagged == []
    suspicion[[4, 9]] = 0.8
    assert select_outliers(suspicion).flagged == [4, 9]


def test_outlier_rule_ignores_sampling_noise_when_most_channels_tie():
    suspicion = np.zeros((16, 2))
    suspicion[3] = 1 / 48           # one image of 48 changed: noise
    assert select_outliers(suspicion, samples=48).flagged == []
    suspicion[7] = 0.5              # half the batch misclassified: an outlier
    assert select_outliers(suspicion, samples=48).flagged == [7]


def test_prediction_scores():
    labels = np.array([0, 1, 2, 3])
    predictions = np.array([[0, 1, 2, 3],       # all right
                            [5, 5, 5, 3],       # three pushed into class 5
                            [1, 0, 2, 2]])      # errors scattered: one image per wrong class
    accuracy, shift, sink = prediction_scores(predictions, labels, 6)
    assert accuracy.tolist() == [1.0, 0.25, 0.25]
    assert shift.tolist() == [0.0, 0.75, 0.25]
    assert sink.tolist() == [-1, 5, 0]      # nothing wrong; class 5; a tie goes to the lowest class
    # an image predicted as its own label never counts towards a shift into that class
    accuracy, shift, sink = prediction_scores(np.array([[0, 0, 0, 0]]), labels, 6)
    assert accuracy.tolist() == [0.25] and shift.tolist() == [0.75] and sink.tolist() == [0]


def test_eps_calibration_picks_the_first_eps_that_moves_predictions():
    report = scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz",
                  ScanConfig(mode="gradient", samples=32, steps=1, skip_layers="block2"), verdict=QUICK_VERDICT)
    trace = report.config["calibration"]
    assert report.config["eps_requested"] == "auto" and report.config["eps"] == trace[-1]["eps"]
    drops = [step["median_relative_drop"] for step in trace]
    assert all(d < 0.25 for d in drops[:-1])
    assert drops[-1] >= 0.25 or trace[-1]["eps"] == EPS_GRID[-1]
    assert [step["eps"] for step in trace] == list(EPS_GRID[:len(trace)])


def test_degenerate_layer_is_reported_not_flagged():
    scores = np.full((10, 2), 0.75)
    for selection in (select_kmeans(scores), select_outliers(scores)):
        assert selection.flagged == [] and selection.degenerate


def _clean_scan(samples: int) -> list[str]:
    """The command line of a quick scan of the clean sample."""
    return ["scan", str(SAMPLES / "clean_op13.onnx"), "--data", str(SAMPLES / "defender.npz"), "--samples",
            str(samples), *QUICK_MARGIN_ARGS]


def test_cli_scan_writes_report_and_refuses_overwrite(tmp_path):
    out = tmp_path / "report.json"
    args = _clean_scan(8)
    result = CliRunner().invoke(main, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "channels flagged" in result.output
    assert json.loads(out.read_text())["summary"]["channels_tested"] == 144
    assert not list(tmp_path.glob(".*.tmp"))
    refused = CliRunner().invoke(main, [*args, "--json", str(SAMPLES / "defender.npz")])
    assert refused.exit_code == 2 and "refusing to overwrite" in refused.output


@pytest.mark.parametrize(("extra", "message"), [
    (["--eps", "0"], "--eps must be"),
    (["--mean", "0.5,0.5", "--std", "0.5,0.5"], "1 or 1 values"),
    (["--mean", "0.5"], "go together"),
    (["--json", "/no/such/folder/r.json"], "output folder does not exist"),
])
def test_cli_scan_bad_options_exit_2(extra, message):
    args = _clean_scan(4)
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1


def test_cli_scan_bad_data_exit_2(tmp_path):
    bad = tmp_path / "d.npz"
    np.savez(bad, x=np.zeros((2, 8, 8), np.uint8), y=np.zeros(2, np.int64))
    result = CliRunner().invoke(main, ["scan", str(SAMPLES / "clean_op13.onnx"), "--data", str(bad)])
    assert result.exit_code == 2 and "differ" in result.output


def test_cli_presets_and_overrides(tmp_path):
    out = tmp_path / "r.json"
    args = [*_clean_scan(8), "--skip-layers", "block", "--json", str(out)]
    result = CliRunner().invoke(main, [*args, "--preset", "paper", "--selection", "outlier"])
    assert result.exit_code == 0, result.output
    config = json.loads(out.read_text())["config"]
    assert (config["preset"], config["mode"], config["eps"], config["steps"], config["score"], config["selection"]) \
        == ("paper", "gradient", 0.06, 1, "accuracy", "outlier")
    out.unlink()
    result = CliRunner().invoke(main, [*args, "--gain", "4"])
    config = json.loads(out.read_text())["config"]
    assert result.exit_code == 0 and (config["mode"], config["gain"], config["score"]) == ("mask", 4.0, "shift")
    assert "preset default: mask mode, gain 4.0" in result.output


@pytest.mark.parametrize(("extra", "message"), [
    (["--eps", "wide"], "--eps must be 'auto' or a number"),
    (["--max-memory", "lots"], "--max-memory must be a size"),
    (["--max-memory", "-2G"], "--max-memory must be a positive size"),
    (["--max-memory", "0"], "--max-memory must be a positive size"),
    (["--gain", "1"], "--gain must be"),
    (["--mode", "gradient", "--steps", "0"], "--steps must be"),
])
def test_cli_scan_bad_method_options_exit_2(extra, message):
    args = _clean_scan(4)
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1


def test_candidate_batches_score_the_same_in_onnxruntime_and_torch():
    """Gradient mode predicts its candidates through ORT by default; the torch module must agree."""
    config = ScanConfig.from_preset("paper", samples=32, skip_layers="block", seed=2)
    by_ort = scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz", config, verdict=QUICK_VERDICT)
    by_torch = scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz",
                    replace(config, predict_with="torch"), verdict=QUICK_VERDICT)
    assert [layer.scores for layer in by_ort.layers] == [layer.scores for layer in by_torch.layers]
    assert by_ort.config["predict_with"] == "onnxruntime" and by_torch.config["predict_with"] == "torch"
    with pytest.raises(ConfigError, match="predict_with"):
        ScanConfig(predict_with="tensorflow")


@pytest.mark.slow
def test_a_small_memory_budget_splits_batches_and_changes_no_score(badnets_report):
    """Under --max-memory the kept forward pass covers a few images at a time: same scores, smaller peaks."""
    tight = scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz", replace(PAPER, max_memory=0.25),
                 verdict=QUICK_VERDICT)
    plan = tight.resources["memory_plan"]
    assert plan["budget_mib"] == 0.25 and plan["gradient_batch"] < N and plan["predict_batch"] < N
    assert plan["candidate_batch"] == 2 * N
    assert [layer.scores for layer in tight.layers] == [layer.scores for layer in badnets_report.layers]
    roomy = badnets_report.resources
    assert roomy["memory_plan"]["gradient_batch"] == N and roomy["peak_rss_mib"] > 0


def test_cli_max_memory_reaches_the_report(tmp_path):
    out = tmp_path / "r.json"
    args = _clean_scan(8)
    result = CliRunner().invoke(main, [*args, "--skip-layers", "block", "--max-memory", "1.5G", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["config"]["max_memory"] == 1536.0 and report["resources"]["memory_plan"]["budget_mib"] == 1536.0
