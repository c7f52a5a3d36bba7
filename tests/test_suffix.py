"""Issue 32: the graph cut at a layer (only what a mask can change runs per setting): the same predictions
as the whole graph on real exported graphs, the shortcut of a residual block fed from the part run once,
and the whole graph where a cut disagrees."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from onnx import helper, numpy_helper

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
    cut = LayerSuffix(LayerSuffix.typed_graph(model.instrumented), model.instrumented, block.name, model.image.name,
                      model.logits_name, "cpu")
    assert len(cut.boundary) == 2 and any(name.startswith("fmt_feature/") for name in cut.boundary)
    # the suffix reads the masks of the layers after this one, never those before it
    assert "fmt_mask/" + loaded.layers[0].name not in cut.suffix.input_names


@pytest.mark.parametrize("failure", ["disagrees", "fails"])
def test_where_the_cut_disagrees_or_fails_the_whole_graph_runs(monkeypatch, failure):
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    model = MaskedModel(loaded.classifier, "cpu")

    def broken(self, boundary, feeds, mask):
        if failure == "fails":
            raise RuntimeError("the suffix cannot run")
        return np.zeros((len(mask), 10), np.float32)

    monkeypatch.setattr(LayerSuffix, "scores", broken)
    layer = loaded.layers[2]
    x = _images(loaded, 4)
    mask = _settings(layer, 2, len(x), seed=1)
    got = model.replicated_predictions(layer.name, x, mask)
    assert model.cuts[layer.name] is False
    np.testing.assert_array_equal(got, model.predict(np.concatenate([x] * 2), masks={layer.name: mask}))


def test_a_batch_sized_tensor_that_is_not_a_batch_is_caught_by_the_check():
    """A float tensor computed from a shape (here the feature map's shape, cast and multiplied into the
    scores) has as many entries as there are images when the batch has 4: the check on two copies of the
    batch catches it, and the whole graph runs."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((2, 1, 2, 2)).astype(np.float32), "W1"),
               numpy_helper.from_array(rng.standard_normal((2, 2, 1, 1)).astype(np.float32), "W2"),
               numpy_helper.from_array(np.ones((2, 4), np.float32), "O"),
               numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "P")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["y1"], name="c1"), helper.make_node("Relu", ["y1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["y2"], name="c2"),
             helper.make_node("GlobalAveragePool", ["y2"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Shape", ["r1"], ["shape"]),
             helper.make_node("Cast", ["shape"], ["s"], to=onnx.TensorProto.FLOAT),
             helper.make_node("MatMul", ["f", "O"], ["u"]), helper.make_node("Mul", ["u", "s"], ["v"]),
             helper.make_node("MatMul", ["v", "P"], ["logits"])]
    graph = helper.make_graph(nodes, "shape_scaled", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                    ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 3])], weights)
    model = MaskedModel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), "cpu", batch_size=5)
    for n in (3, 4):
        x = rng.random((n, 1, 4, 4), dtype=np.float32)
        mask = np.ones((2 * n, 2, 1, 1), np.float32)
        mask[n:, 0] = 0
        got = model.replicated_predictions("c2", x, mask)
        np.testing.assert_array_equal(got, model.predict(np.concatenate([x] * 2), masks={"c2": mask}))


def test_new_images_are_cut_anew():
    """The cut keeps the feature maps of the images it was given: other images, even in an array of the same
    shape at the same address, get their own."""
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    model = MaskedModel(loaded.classifier, "cpu")
    layer = loaded.layers[3]
    for seed in range(3):
        x = _images(loaded, 4, seed=seed)
        mask = _settings(layer, 2, len(x), seed=seed)
        got = model.replicated_predictions(layer.name, x, mask)
        np.testing.assert_array_equal(got, model.predict(np.concatenate([x] * 2), masks={layer.name: mask}))
        del x


def test_feature_maps_over_the_memory_for_the_cut_run_the_whole_graph():
    loaded = load_model(SAMPLES / "badnets_op13.onnx")
    layer = loaded.layers[1]
    x = _images(loaded, 4)
    mask = _settings(layer, 2, len(x), seed=2)
    small = MaskedModel(loaded.classifier, "cpu", cut_memory=1024)       # 1 KiB: less than one feature map
    roomy = MaskedModel(loaded.classifier, "cpu", cut_memory=2**30)
    np.testing.assert_array_equal(small.replicated_predictions(layer.name, x, mask),
                                  roomy.replicated_predictions(layer.name, x, mask))
    assert small.cuts[layer.name] is False and roomy.cuts[layer.name] is True


def test_the_scan_report_names_the_layers_that_ran_the_whole_graph():
    """Same flags either way; with too little memory for any layer's feature maps, every layer is named."""
    from fmt_audit.fmt.scan import ScanConfig, scan

    cut = scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz", ScanConfig(samples=64), verdict=None)
    whole = scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz", ScanConfig(samples=64, max_memory=0.01),
                 verdict=None)
    assert cut.config["whole_graph_layers"] == []
    assert whole.config["whole_graph_layers"] == [layer.name for layer in whole.layers]
    assert cut.flagged == whole.flagged
    assert [layer.shift for layer in cut.layers] == [layer.shift for layer in whole.layers]
