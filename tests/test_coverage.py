"""Architecture and exporter coverage (issue 9): every case runs inspect, a small scan and a one-epoch repair
to the end, ONNX Runtime and torch agree on the repaired model, and the write-back keeps the graph's structure.

The cases are torchvision's own architectures at tiny widths (``sample_models/zoo.py``)
through torch's legacy exporter (opsets 11, 13, 17) and its default dynamo exporter
(external data), and hand-built graphs in styles no exporter here writes. The
full-size architectures run in ``benchmarks/coverage.py`` (README, "Coverage").
Weights are random and labels are the model's own predictions: these tests are
about the pipeline reaching the end correctly, not about finding backdoors.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import onnx
import pytest
from conftest import QUICK_MARGIN_ARGS, QUICK_VERDICT, SAMPLES
from onnx import numpy_helper

from fmt_audit.backends.onnxrt.session import OrtClassifier
from fmt_audit.data import Preprocessing
from fmt_audit.fmt.scan import ScanConfig, scan
from fmt_audit.model.inspection import summarize
from fmt_audit.model.loading import load_model
from fmt_audit.repair.config import FineTuneConfig
from fmt_audit.repair.pipeline import RepairConfig, repair

sys.path.insert(0, str(SAMPLES))
import zoo

# every exporter on the family with the most kinds of layer (depthwise, squeeze-and-excitation 1x1 maps);
# the others through one exporter each, the two kinds alternating (every family through every exporter, at
# full size: benchmarks/coverage.py); resnet18's blocks are full width even when shallow: benchmarks only
EXPORTED = ([("efficientnet", exporter) for exporter in zoo.EXPORTERS]
            + [("vgg", "dynamo"), ("mobilenet_v2", "legacy-13"), ("shufflenet", "legacy-13"), ("densenet", "dynamo"),
               ("inception", "legacy-13")])
# the quick suite keeps one family through both exporters (dynamo, legacy opset 13) and one other family; the
# rest (7-10 s each) run in the slow step, so every case still runs in CI
QUICK = {"efficientnet/dynamo", "efficientnet/legacy-13", "mobilenet_v2/legacy-13"}
CASES = ([case if case in QUICK else pytest.param(case, marks=pytest.mark.slow)
          for case in (f"{family}/{exporter}" for family, exporter in EXPORTED)]
         + [f"graph/{name}" for name in zoo.GRAPHS])


@pytest.fixture(scope="session")
def zoo_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def build_case(case: str, folder) -> object:
    kind, name = case.split("/")
    path = folder / f"{kind}_{name}.onnx"
    if path.exists():
        return path
    if kind == "graph":
        onnx.save(zoo.GRAPHS[name](), str(path))
        return path
    with warnings.catch_warnings():     # the legacy exporter's deprecation notice
        warnings.simplefilter("ignore")
        return zoo.export(zoo.network(kind), name, path, zoo.FAMILIES[kind].input_size("mini", name))


@pytest.mark.parametrize("case", CASES)
def test_case_runs_inspect_scan_repair_to_the_end(case, zoo_folder, tmp_path):
    path = build_case(case, zoo_folder)
    loaded = load_model(path)
    summary = summarize(loaded).to_dict()
    assert summary["conv"]["channels"] > 0
    if case.split("/")[0] in ("efficientnet", "mobilenet_v2", "shufflenet"):
        assert summary["conv"]["depthwise"] > 0
    if case.startswith("efficientnet"):    # squeeze-and-excitation Convs act on 1x1 maps, and are tested
        assert summary["conv"]["one_by_one_maps"] > 0
    data = zoo.own_labels(loaded)
    config = ScanConfig(samples=8)
    report = scan(loaded, data, config, verdict=QUICK_VERDICT)
    assert [layer.name for layer in report.layers] == [layer.name for layer in loaded.layers]
    depthwise = {layer.name for layer in loaded.layers if layer.depthwise}
    assert {layer.name for layer in report.layers if layer.depthwise} == depthwise

    first = loaded.layers[0]     # at least one removed channel, whatever the random weights made the scan flag
    removed = {**report.flagged, first.name: sorted({0, *report.flagged.get(first.name, [])})}
    # repair verifies before it returns: checker, ONNX Runtime against torch within 1e-4, removed tensors zero
    result = repair(loaded, data, RepairConfig(fine_tune=FineTuneConfig(epochs=1, batch_size=8)), config,
                    flagged=removed)
    stored = {t.name: t for t in result.model.graph.initializer}
    assert not numpy_helper.to_array(stored[first.weight])[0].any()    # read back from the written graph
    original = onnx.load(str(path))
    assert zoo.structure(result.model, original) == zoo.structure(original, original)
    # the fine-tuning moved weights, and the repaired graph runs where the original did
    before = {t.name: numpy_helper.to_array(t) for t in loaded.proto.graph.initializer}
    assert any(not np.array_equal(numpy_helper.to_array(t), before[t.name])
               for t in result.model.graph.initializer if t.name in before)
    logits = OrtClassifier(result.model, "cpu", Preprocessing()).logits(data.x[:4])
    assert logits.shape == (4, zoo.CLASSES) and np.isfinite(logits).all()


def test_nhwc_graph_takes_images_in_its_layout():
    """An NHWC graph gets the same predictions as its NCHW twin on the same NCHW images."""
    nhwc, nchw = zoo.small_graph(layout="NHWC"), zoo.small_graph()
    x = np.random.default_rng(1).random((5, 3, 32, 32)).astype(np.float32)
    a = OrtClassifier(nhwc, "cpu", Preprocessing()).logits(x)
    b = OrtClassifier(nchw, "cpu", Preprocessing()).logits(x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_nhwc_graph_through_the_cli_with_uint8_nhwc_data(tmp_path):
    """The data file convention (uint8 NHWC images) meets an NHWC graph: inspect names the layout, scan and
    repair take the images as they come."""
    import json

    from click.testing import CliRunner
    from fmt_audit_cli.main import main

    path = tmp_path / "nhwc.onnx"
    onnx.save(zoo.GRAPHS["nhwc-input-transpose"](), str(path))
    loaded = load_model(path)
    images = zoo.own_labels(loaded, 32)
    np.savez(tmp_path / "data.npz", x=np.round(images.x.transpose(0, 2, 3, 1) * 255).astype(np.uint8),
             y=images.y)
    inspected = CliRunner().invoke(main, ["inspect", str(path), "--json", "-"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.stdout)["image_input"]["layout"] == "NHWC"
    for command in (["scan", str(path), "--samples", "8", *QUICK_MARGIN_ARGS],
                    ["repair", str(path), "--samples", "8", "--epochs", "1", "--verdict", "none",
                     "-o", str(tmp_path / "out.onnx")]):
        result = CliRunner().invoke(main, [*command, "--data", str(tmp_path / "data.npz")])
        assert result.exit_code == 0, result.output
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert written.graph.input[0].type == loaded.proto.graph.input[0].type     # still NHWC
