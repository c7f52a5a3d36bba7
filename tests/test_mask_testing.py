import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLES

from fmt_audit.backends.onnxrt.masked import MaskedModel
from fmt_audit.backends.onnxrt.session import create_session
from fmt_audit.data import load_data, load_npz
from fmt_audit.fmt.mask import MaskTestConfig, MaskTester
from fmt_audit.fmt.scan import ScanConfig, scan
from fmt_audit.model.graph import conv_layers
from fmt_audit.model.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from oracle import trigger_response

N = 40


@pytest.fixture(scope="module")
def badnets():
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    data = load_data(SAMPLES / "defender.npz", loaded.image_input, 10).take(N, seed=3)
    return loaded, data


def _with_channel_scaled(model: onnx.ModelProto, layer_name: str, channel: int, factor: float) -> onnx.ModelProto:
    """A copy of the model with one Conv output channel's filter and bias multiplied by ``factor``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    layer = next(layer for layer in conv_layers(copy) if layer.name == layer_name)
    for init in copy.graph.initializer:
        if init.name in (layer.weight, layer.bias):
            values = onnx.numpy_helper.to_array(init).copy()
            values[channel] *= factor
            init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    return copy


def test_masks_act_like_scaling_the_conv_filter(badnets):
    """Mask value v on channel c == the Conv's filter c and bias c multiplied by v, run in plain ORT."""
    loaded, data = badnets
    model = MaskedModel(loaded.proto, "cpu")
    for layer_index, channel, value in ((0, 5, 0.0), (3, 7, 10.0), (5, 2, 0.0)):
        layer = loaded.layers[layer_index]
        mask = np.ones((1, layer.out_channels, 1, 1), np.float32)
        mask[0, channel] = value
        masked_logits, _ = model.run(data.x, {layer.name: mask})
        edited = create_session(_with_channel_scaled(loaded.proto, layer.name, channel, value), "cpu")
        direct = edited.run({"input": data.x})[0]
        np.testing.assert_allclose(masked_logits, direct, rtol=1e-4, atol=1e-4)


def test_mask_scores_match_one_setting_at_a_time(badnets):
    loaded, data = badnets
    model = MaskedModel(loaded.proto, "cpu", batch_size=64)   # many settings per call, cut across batches
    tester = MaskTester(model, data.x, data.y, 10, MaskTestConfig(gain=10.0, max_batch=200))
    layer = loaded.layers[2]
    scores = tester.score_layer(layer)
    assert scores.accuracy.shape == (layer.out_channels, 3)
    for channel in (0, 6, 15):
        for column, value in enumerate((0.0, 10.0, -10.0)):
            mask = np.ones((1, layer.out_channels, 1, 1), np.float32)
            mask[0, channel] = value
            predictions = model.run(data.x, {layer.name: mask})[0].argmax(1)
            assert scores.accuracy[channel, column] == pytest.approx((predictions == data.y).mean())
            wrong = predictions[predictions != data.y]
            expected_shift = np.bincount(wrong, minlength=10).max() / N if len(wrong) else 0.0
            assert scores.shift[channel, column] == pytest.approx(expected_shift)


def test_removing_channels_through_masks_matches_predict(badnets):
    loaded, data = badnets
    model = MaskedModel(loaded.proto, "cpu")
    removed = {loaded.layers[1].name: [0, 1, 2, 3], loaded.layers[4].name: list(range(16))}
    edited = loaded.proto
    for name, channels in removed.items():
        for channel in channels:
            edited = _with_channel_scaled(edited, name, channel, 0.0)
    direct = create_session(edited, "cpu").run({"input": data.x})[0].argmax(1)
    np.testing.assert_array_equal(model.predict(data.x, removed=removed), direct)


def test_mask_mode_scan_needs_no_torch_and_reports_the_provider(badnets):
    loaded, _ = badnets
    report = scan(loaded, SAMPLES / "defender.npz", ScanConfig(mode="mask", samples=N, seed=1), verdict=None)
    config = report.config
    assert config["mode"] == "mask" and config["ort_provider"] == "CPUExecutionProvider"
    assert config["bridge_steps"] is None and config["calibration"] == []
    assert report.summary["channels_tested"] == 144
    again = scan(loaded, SAMPLES / "defender.npz", ScanConfig(mode="mask", samples=N, seed=1), verdict=None).to_dict()
    first = report.to_dict()
    for key in ("timing", "resources"):
        first.pop(key), again.pop(key)
    assert first == again


def test_trigger_response_finds_responsive_channels_only_with_a_trigger(badnets):
    loaded, _ = badnets
    model = MaskedModel(loaded.proto, "cpu")
    clean = load_npz(SAMPLES / "test.npz").x[:200]
    triggered = load_npz(SAMPLES / "badnets_test.npz").x[:200]
    response = trigger_response(model, clean, triggered)
    assert response.count > 0
    # the 3x3 corner patch changes the stem's input directly: some stem channels must respond
    assert response.channels[loaded.layers[0].name]
    assert trigger_response(model, clean, clean).count == 0
    everything = {layer.name: list(range(layer.out_channels)) for layer in loaded.layers}
    assert response.coverage(everything) == 1.0 and response.coverage({}) == 0.0
    with pytest.raises(ValueError, match="pair up"):
        trigger_response(model, clean, triggered[:10])
