"""Issue 32: the graph cut at a layer (only what a mask can change runs per setting): the same predictions
as the whole graph on real exported graphs, the shortcut of a residual block fed from the part run once,
and the whole graph where a cut disagrees."""

from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLES

from fmt_audit.backends.onnxrt.masked import MaskedModel
from fmt_audit.backends.onnxrt.suffix import LayerSuffix
from fmt_audit.model.loading import load_model

FIXTURES = Path(__file__).parent / "fixtures" / "exporters"
# the real third-party graphs, but the 224x224 ImageNet SqueezeNet (its many layers take seconds each)
GRAPHS = [SAMPLES / "badnets_op13.onnx", SAMPLES / "badnets_op18.onnx",
          *sorted(p for p in FIXTURES.glob("*.onnx") if "light_squeezenet" not in p.name)]


def _images(loaded, count: int, seed: int = 0) -> np.ndarray:
    image = loaded.image_input
    return np.random.default_rng(seed).random((count, image.channels or 3, image.height or 32, image.width or 32),
                                              dtype=np.float32)


def _settings(layer, replicas: int, n: int, seed: int) -> np.ndarray:
    """A mask of ``replicas * n`` rows, each replica one channel at 0, 10 or -10."""
    rng = np.random.default_rng(seed)
    mask = np.ones((replicas * n, layer.out_channels, 1, 1), np.float32)
    for r in range(replicas):
        mask[r * n:(r + 1) * n, rng.integers(layer.out_channels)] = rng.choice([0.0, 10.0, -10.0])
    return mask


@pytest.mark.parametrize("path", GRAPHS, ids=lambda p: p.name)
def test_the_cut_graph_predicts_what_the_whole_graph_does(path):
    """At the first, a middle and the last layer: NHWC graphs, Shape-computed reshapes, residual shortcuts,
    graphs fixed to batch 1 and freed."""
    loaded = load_model(path)
    model = MaskedModel(loaded.classifier, "cpu", batch_size=5)     # batches that cut across the copies
    x = _images(loaded, 4)
    layers = loaded.layers
    for layer in {layers[0].name: layers[0], layers[len(layers) // 2].name: layers[len(layers) // 2],
                  layers[-1].name: layers[-1]}.values():
        mask = _settings(layer, 3, len(x), seed=len(layer.name))
        cut = model.replicated_predictions(layer.name, x, mask)
        assert model.cuts[layer.name], f"{layer.name} was not cut"
        whole = model.predict(np.concatenate([x] * 3), masks={layer.name: mask})
        np.testing.assert_array_equal(cut, whole)


def test_a_residual_layer_is_fed_its_shortcut_from_the_part_run_once():
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    model = MaskedModel(loaded.classifier, "cpu")
    block = next(layer for layer in loaded.layers if "block2/conv1" in layer.name)
    cut = LayerSuffix(model.instrumented, block.name, model.image.name, model.logits_name, "cpu")
    assert len(cut.boundary) == 2 and any(name.startswith("fmt_feature/") for name in cut.boundary)
    # the suffix reads the masks of the layers after this one, never those before it
    assert "fmt_mask/" + loaded.layers[0].name not in cut.suffix.input_names


def test_where_the_cut_disagrees_the_whole_graph_runs(monkeypatch):
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    model = MaskedModel(loaded.classifier, "cpu")
    monkeypatch.setattr(LayerSuffix, "agrees", lambda *args: False)
    layer = loaded.layers[2]
    x = _images(loaded, 4)
    mask = _settings(layer, 2, len(x), seed=1)
    got = model.replicated_predictions(layer.name, x, mask)
    assert model.cuts[layer.name] is False
    np.testing.assert_array_equal(got, model.predict(np.concatenate([x] * 2), masks={layer.name: mask}))
