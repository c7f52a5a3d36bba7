"""Issue 32: the graph cut at a layer (only what a mask can change runs per setting) and the fast budget
(screen every channel on a quarter of the images, confirm on all of them where the outlier rule might flag)."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLES
from fmt_audit_cli.main import main as cli

from fmt_audit.backends.onnxrt.masked import MaskedModel
from fmt_audit.backends.onnxrt.suffix import LayerSuffix
from fmt_audit.data import load_npz
from fmt_audit.errors import ConfigError
from fmt_audit.fmt.scan import ScanConfig, scan
from fmt_audit.fmt.screening import screen_size
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


def test_the_screen_runs_only_where_it_saves_work():
    assert screen_size(256, "fast", "outlier") == 64
    assert screen_size(200, "fast", "outlier") == 50
    assert screen_size(63, "fast", "outlier") is None       # under two screens of 32 images
    assert screen_size(256, "exact", "outlier") is None
    assert screen_size(256, "fast", "kmeans") is None       # the paper's rule needs every score exact
    assert ScanConfig.from_preset("paper").budget == "exact"
    assert ScanConfig().budget == "fast"
    with pytest.raises(ConfigError, match="--budget must be one of fast, exact; got 'quick'"):
        ScanConfig(budget="quick")


@pytest.fixture(scope="module")
def budgets():
    data = load_npz(SAMPLES / "defender.npz")
    return {(attack, budget): scan(SAMPLES / f"{attack}_op13.onnx", data, ScanConfig(budget=budget), verdict=None)
            for attack in ("badnets", "blended", "clean") for budget in ("fast", "exact")}


def test_the_fast_budget_flags_what_the_exact_one_does(budgets):
    """The bundled samples: the same flags with the backdoors; on the clean model every exact flag too."""
    for attack in ("badnets", "blended"):
        assert budgets[attack, "fast"].flagged == budgets[attack, "exact"].flagged
    assert budgets["badnets", "exact"].flagged     # the comparison is not between two empty sets
    fast, exact = budgets["clean", "fast"].flagged, budgets["clean", "exact"].flagged
    assert all(set(channels) <= set(fast.get(layer, [])) for layer, channels in exact.items())


def test_the_report_says_which_channels_were_tested_on_all_images(budgets):
    fast, exact = budgets["badnets", "fast"], budgets["badnets", "exact"]
    assert fast.config["budget"] == "fast" and exact.config["budget"] == "exact"
    confirmed = 0
    for screened, full in zip(fast.layers, exact.layers, strict=True):
        screen = screened.selection["screen"]
        assert screen["images"] == 50 and "screen" not in full.selection
        assert set(screened.flagged) <= set(screen["confirmed"])
        for channel in screen["confirmed"]:     # confirmed channels carry the exact scores
            assert screened.shift[channel] == full.shift[channel]
        confirmed += len(screen["confirmed"])
    assert 0 < confirmed < sum(layer.channels for layer in fast.layers) / 4


def test_budget_on_the_command_line(tmp_path):
    out = tmp_path / "scan.json"
    result = CliRunner().invoke(cli, ["scan", str(SAMPLES / "clean_op13.onnx"), "--data", str(SAMPLES / "defender.npz"),
                                      "--budget", "exact", "--verdict", "none", "--samples", "64", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert '"budget": "exact"' in out.read_text()
    result = CliRunner().invoke(cli, ["scan", str(SAMPLES / "clean_op13.onnx"), "--data", str(SAMPLES / "defender.npz"),
                                      "--budget", "quick"])
    assert result.exit_code == 2 and "quick" in result.output
