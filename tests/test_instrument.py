import numpy as np
import onnx
import pytest
from conftest import build_synthetic, sample_images, synthetic_images

from fmt_audit.backends.onnxrt.instrument import feature_output_name, instrument, mask_input_name
from fmt_audit.backends.onnxrt.session import create_session
from fmt_audit.model.graph import conv_layers
from fmt_audit.model.loading import load_model


def _ones(layers, batch=1):
    return {mask_input_name(layer.name): np.ones((batch, layer.out_channels, 1, 1), np.float32)
            for layer in layers}


def _check_instrumented(model: onnx.ModelProto, x: np.ndarray):
    layers = conv_layers(model)
    reference = create_session(model, "cpu")
    input_name = reference.input_names[0]
    expected = reference.run({input_name: x})[0]
    instrumented = instrument(model)
    onnx.checker.check_model(instrumented, full_check=True)
    session = create_session(instrumented, "cpu")
    assert set(session.input_names) == {input_name} | {mask_input_name(layer.name) for layer in layers}
    outputs = session.run({input_name: x, **_ones(layers)})
    assert session.output_names[0] == reference.output_names[0]
    assert np.abs(outputs[0] - expected).max() <= 1e-5
    # one exposed feature map per Conv, with the Conv's channel count
    for layer in layers:
        feature = outputs[session.output_names.index(feature_output_name(layer.name))]
        assert feature.shape[:2] == (len(x), layer.out_channels)


def test_all_ones_reproduces_every_sample(sample_path):
    _check_instrumented(load_model(sample_path).proto, sample_images(n=32))


def test_all_ones_reproduces_grouped_depthwise_and_batchnorm_graph():
    _check_instrumented(build_synthetic(), synthetic_images())


@pytest.mark.parametrize("layer_index", [0, 1, 2])
def test_zero_mask_silences_exactly_one_channel_downstream(layer_index):
    model = build_synthetic()
    layers = conv_layers(model)
    layer = layers[layer_index]
    instrumented = instrument(model)
    # expose the Mul's output (the Conv's original output name) to observe what consumers see
    instrumented.graph.output.append(onnx.helper.make_tensor_value_info(layer.output, onnx.TensorProto.FLOAT, None))
    session = create_session(instrumented, "cpu")
    x = synthetic_images()
    masks = _ones(layers)
    masks[mask_input_name(layer.name)][0, 1] = 0.0
    outputs = dict(zip(session.output_names, session.run({"x": x, **masks})))
    masked, feature = outputs[layer.output], outputs[feature_output_name(layer.name)]
    assert np.all(masked[:, 1] == 0.0)
    assert np.abs(feature[:, 1]).max() > 0  # the feature itself is still exposed unmasked
    np.testing.assert_array_equal(np.delete(masked, 1, axis=1), np.delete(feature, 1, axis=1))


def test_per_image_masks_in_one_run():
    """A mask per image (leading dimension = batch) gives many mask settings in one session run."""
    model = build_synthetic()
    layers = conv_layers(model)
    session = create_session(instrument(model), "cpu")
    x = np.repeat(synthetic_images(n=1), 4, axis=0)
    masks = _ones(layers, batch=4)
    first = mask_input_name(layers[0].name)
    for channel in range(3):
        masks[first][channel + 1, channel] = 0.0  # image 0 unmasked, image k has channel k-1 off
    logits = session.run({"x": x, **masks})[0]
    for channel in range(3):
        single = _ones(layers)
        single[first][0, channel] = 0.0
        alone = session.run({"x": x[:1], **single})[0]
        np.testing.assert_allclose(logits[channel + 1], alone[0], atol=1e-6)
    assert not np.allclose(logits[0], logits[1])


def test_instrument_subset_and_unknown_layer():
    model = build_synthetic()
    instrumented = instrument(model, layers=["conv3"])
    names = {value.name for value in instrumented.graph.input}
    assert names == {"x", mask_input_name("conv3")}
    with pytest.raises(ValueError, match="not Conv layers"):
        instrument(model, layers=["relu"])


def test_instrument_does_not_modify_its_input():
    model = build_synthetic()
    before = model.SerializeToString()
    instrument(model)
    assert model.SerializeToString() == before
