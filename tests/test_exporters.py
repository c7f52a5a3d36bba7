"""Graphs as other exporters write them (issue 33): each case is a small graph that reproduces what a real
exporter wrote (tf2onnx, paddle2onnx, CNTK, Caffe2, older PyTorch), checked through the stage that failed."""

import numpy as np
import onnx
import pytest
import torch
from conftest import _init, build_synthetic, save
from onnx import TensorProto, helper

from fmt_audit.backends.onnxrt.session import create_session
from fmt_audit.backends.torch.bridge import to_torch, write_back
from fmt_audit.data import Dataset
from fmt_audit.errors import BridgeError
from fmt_audit.fmt.scan import ScanConfig, scan
from fmt_audit.model.inspection import summarize
from fmt_audit.model.loading import load_model


def _ort_logits(model, x):
    session = create_session(model, "cpu")
    return session.run({session.input_names[0]: x})[0]


def _audited_end_to_end(path, classes: int, size: tuple[int, int, int] = (3, 8, 8)) -> None:
    """inspect, a scan in mask and in gradient mode, a one-epoch repair: all run, and the repaired graph
    runs in ONNX Runtime with the classes' count of scores."""
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig
    from fmt_audit.repair.pipeline import repair

    loaded = load_model(path)
    assert summarize(loaded).num_classes == classes
    rng = np.random.default_rng(0)
    data = Dataset(rng.random((40, *size), dtype=np.float32), rng.integers(0, classes, 40))
    for mode in ("mask", "gradient"):
        report = scan(loaded, data, ScanConfig(mode=mode, samples=8), verdict=None)
        assert [len(r.scores) for r in report.layers] == [layer.out_channels for layer in loaded.layers]
    result = repair(loaded, data, RepairConfig(FineTuneConfig(epochs=1)), ScanConfig(samples=8),
                    flagged={loaded.layers[0].name: [0]})
    assert result.report.verification["checker"] == "passed"
    from fmt_audit.backends.onnxrt.session import OrtClassifier
    from fmt_audit.model.graph import classifier_graph

    assert OrtClassifier(classifier_graph(result.model, loaded.scores), "cpu").logits(data.x[:3]).shape == (3, classes)


def _auto_pad_graph(height: int | str = 8, width: int | str = 8) -> onnx.ModelProto:
    """x [N,3,H,W] -> Conv 3x3 stride 2 SAME_UPPER -> Relu -> MaxPool 2x2 stride 1 SAME_LOWER -> Conv 1x1 VALID
    -> GlobalAveragePool -> Flatten -> Gemm -> [N,5] (TensorFlow's 'same' padding, as tf2onnx and CNTK write it).
    At 8x8 the strided Conv pads 0 before and 1 after; the pool 1 before and 0 after."""
    rng = np.random.default_rng(0)
    inits = [_init(rng, "c1.w", 4, 3, 3, 3), _init(rng, "c1.b", 4), _init(rng, "c2.w", 6, 4, 1, 1),
             _init(rng, "fc.w", 6, 5), _init(rng, "fc.b", 5)]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], name="c1", strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], auto_pad="SAME_LOWER"),
        helper.make_node("Conv", ["p1", "c2.w"], ["c2"], name="c2", auto_pad="VALID"),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=0),
    ]
    graph = helper.make_graph(nodes, "same_padding",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, height, width])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx-like")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_auto_pad_same_is_written_as_explicit_pads_for_the_bridge(tmp_path):
    """Case 8: onnx2torch refuses auto_pad SAME_*; the bridge's copy gets ONNX's exact pads (uneven here), so
    torch agrees with ONNX Runtime, inspect says so, and the written graph keeps its auto_pad."""
    model = _auto_pad_graph()
    loaded = load_model(save(model, tmp_path / "same.onnx"))
    assert summarize(loaded).bridge_unsupported == []
    bridge = to_torch(loaded.proto)
    assert any("explicit pads on 3 nodes" in step for step in bridge.steps)
    x = np.random.default_rng(1).random((6, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        torch_logits = bridge.module(torch.from_numpy(x)).numpy()
    assert np.abs(torch_logits - _ort_logits(loaded.proto, x)).max() <= 1e-4
    with torch.no_grad():
        bridge.conv_weights("c1").weight.mul_(0.5)
    written = write_back(loaded.proto, bridge)
    assert [onnx.helper.get_attribute_value(a) for n in written.graph.node for a in n.attribute
            if a.name == "auto_pad"] == [b"SAME_UPPER", b"SAME_LOWER", b"VALID"]
    with torch.no_grad():
        halved = bridge.module(torch.from_numpy(x)).numpy()
    assert np.abs(halved - _ort_logits(written, x)).max() <= 1e-4


def test_strided_same_padding_over_an_unknown_size_is_named_by_inspect_and_refused_in_one_line(tmp_path):
    """The padding of a strided SAME Conv depends on the input size: unknown, the bridge cannot know it."""
    loaded = load_model(save(_auto_pad_graph("H", "W"), tmp_path / "same_dynamic.onnx"))
    unsupported = summarize(loaded).bridge_unsupported
    assert len(unsupported) == 1 and unsupported[0].startswith("c1: auto_pad SAME_UPPER at stride [2, 2]")
    with pytest.raises(BridgeError, match="cannot convert c1: auto_pad SAME_UPPER") as caught:
        to_torch(loaded.proto)
    assert "\n" not in str(caught.value)


def test_a_batch_declared_minus_one_is_free(tmp_path):
    """Case 4: paddle2onnx writes the free batch as dim_value -1; every runtime reads it as unknown."""
    path = save(build_synthetic(batch=-1), tmp_path / "paddle_like.onnx")
    loaded = load_model(path)
    assert loaded.image_input.batch is None and loaded.image_input.shape == (None, 3, 8, 8)
    assert "image input  x ?x3x8x8 float32" in summarize(loaded).format_text()
    _audited_end_to_end(path, classes=5)


def _nhwc_after_cast_graph() -> onnx.ModelProto:
    """x [N,8,8,3] -> Cast(float) -> Transpose(0,3,1,2) -> the synthetic network: a PyTorch 2.x export that
    casts its NHWC input before it transposes it."""
    inner = build_synthetic()
    graph = inner.graph
    first = [n for n in graph.node if "x" in n.input]
    for node in first:
        node.input[list(node.input).index("x")] = "x_nchw"
    graph.node.insert(0, helper.make_node("Transpose", ["x_float"], ["x_nchw"], name="to_nchw", perm=[0, 3, 1, 2]))
    graph.node.insert(0, helper.make_node("Cast", ["x"], ["x_float"], name="cast", to=TensorProto.FLOAT))
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 3]))
    onnx.checker.check_model(inner, full_check=True)
    return inner


def test_nhwc_input_transposed_after_a_cast_is_read_as_nhwc(tmp_path):
    """Case 3: the input batchx8x8x3 was read as 8 channels when a Cast came before the Transpose."""
    path = save(_nhwc_after_cast_graph(), tmp_path / "nhwc_cast.onnx")
    loaded = load_model(path)
    assert loaded.image_input.layout == "NHWC" and loaded.image_input.channels == 3
    _audited_end_to_end(path, classes=5)


def _pooled_scores_graph() -> onnx.ModelProto:
    """The synthetic network cut after its global pool: class scores shaped [N, 6, 1, 1], no Flatten (a
    Caffe2-era SqueezeNet ends so)."""
    model = build_synthetic()
    graph = model.graph
    nodes = [n for n in graph.node if n.op_type not in ("Flatten", "Gemm")]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if not t.name.startswith("fc.")]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 6, 1, 1]))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_class_scores_shaped_n_k_1_1_count_k_classes(tmp_path):
    """Case 1: a [N, K, 1, 1] output was read as 1 class."""
    path = save(_pooled_scores_graph(), tmp_path / "pooled.onnx")
    assert "classes      6" in summarize(load_model(path)).format_text()
    _audited_end_to_end(path, classes=6)


def test_weights_computed_by_other_nodes_are_named_not_counted_as_zero(tmp_path):
    """Case 7: a Conv weight made by ConstantOfShape was counted as 0 parameters without a word."""
    model = build_synthetic()
    graph = model.graph
    weight = next(t for t in graph.initializer if t.name == "conv3.w")
    graph.initializer.remove(weight)
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(weight.dims, np.int64), "conv3.shape"))
    graph.node.insert(0, helper.make_node("ConstantOfShape", ["conv3.shape"], ["conv3.w"], name="fill",
                                          value=onnx.numpy_helper.from_array(np.array([0.1], np.float32))))
    summary = summarize(load_model(save(model, tmp_path / "computed.onnx")))
    assert summary.computed_weights == ["conv3"]
    text = summary.format_text()
    assert "1 Conv layer(s) compute their weights from other nodes (conv3): not counted" in text
    assert "cannot convert: conv3: weights computed by other nodes" in text


def _expects_0_255() -> onnx.ModelProto:
    """The synthetic network behind a Mul by 1/255: a model that takes pixels in 0-255 (CNTK's MNIST does)."""
    model = build_synthetic()
    graph = model.graph
    for node in graph.node:
        if "x" in node.input:
            node.input[list(node.input).index("x")] = "x_unit"
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1 / 255, np.float32), "per_255"))
    graph.node.insert(0, helper.make_node("Mul", ["x", "per_255"], ["x_unit"], name="scale"))
    return model


def test_input_range_maps_pixels_before_mean_and_std(tmp_path):
    """Case 9: a model that takes 0-255 pixels needs --input-range 0-255 (it needed --mean 0 --std 0.00392)."""
    from click.testing import CliRunner
    from fmt_audit_cli.main import main as cli

    from fmt_audit.backends.torch.bridge import BridgedClassifier
    from fmt_audit.data import Preprocessing
    from fmt_audit.repair.evaluation import evaluate

    x = np.random.default_rng(3).random((5, 3, 8, 8), dtype=np.float32)
    assert np.allclose(Preprocessing(input_range="0-255").apply(x), x * 255, atol=1e-4)
    assert np.allclose(Preprocessing((127.5,), (127.5,), "0-255").apply(x), Preprocessing(input_range="-1-1").apply(x),
                       atol=1e-5)
    path = save(_expects_0_255(), tmp_path / "takes_0_255.onnx")
    images = np.random.default_rng(4).random((40, 3, 8, 8), dtype=np.float32)
    data = Dataset(images, _ort_logits(build_synthetic(), images).argmax(1))
    assert evaluate(path, data, preprocessing=Preprocessing(input_range="0-255")).metrics.acc == 1.0
    reference = _ort_logits(build_synthetic(), images)
    bridge = to_torch(load_model(path).proto)
    assert np.abs(BridgedClassifier(bridge, Preprocessing(input_range="0-255")).logits(images)
                  - reference).max() <= 1e-4
    assert np.abs(BridgedClassifier(bridge, Preprocessing()).logits(images) - reference).max() > 1e-2
    np.savez(tmp_path / "data.npz", x=images, y=data.y)
    ok = CliRunner().invoke(cli, ["evaluate", str(path), "--data", str(tmp_path / "data.npz"),
                                  "--input-range", "0-255"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(cli, ["evaluate", str(path), "--data", str(tmp_path / "data.npz"),
                                   "--input-range", "0-2"])
    assert bad.exit_code == 2 and "--input-range" in bad.output


def _two_headed(box_op: str = "Gemm") -> onnx.ModelProto:
    """The synthetic network with a box head first (Conv -> pool -> MatMul -> [N, 4]) and the class scores
    second (MatMul -> Softmax -> [N, 2]), as a face detector's stage writes them; ``box_op`` "Softmax" gives the
    box head a Softmax too (no rule can tell them apart then)."""
    model = build_synthetic()
    graph = model.graph
    rng = np.random.default_rng(5)
    graph.initializer.extend([_init(rng, "boxconv.w", 6, 6, 1, 1), _init(rng, "box.w", 6, 4),
                              _init(rng, "cls.w", 6, 2)])
    graph.node.extend([
        helper.make_node("Conv", ["c3", "boxconv.w"], ["bc"], name="boxconv"),
        helper.make_node("GlobalAveragePool", ["bc"], ["bp"], name="boxpool"),
        helper.make_node("Flatten", ["bp"], ["bf"], name="boxflat"),
        helper.make_node("MatMul", ["bf", "box.w"], ["box_raw"], name="box"),
        helper.make_node(box_op if box_op == "Softmax" else "Identity", ["box_raw"], ["boxes"], name="box_out"),
        helper.make_node("MatMul", ["f", "cls.w"], ["cls_logits"], name="cls"),
        helper.make_node("Softmax", ["cls_logits"], ["prob"], name="prob", axis=1),
    ])
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 4]),
                         helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 2]),
                         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_the_class_scores_of_a_model_with_several_outputs(tmp_path):
    """Case 2: the first output (a box head) was taken as the logits. The rule takes the only Softmax output
    of score shape; --class-output names another; where no rule decides, a one-line error lists the outputs."""
    from click.testing import CliRunner
    from fmt_audit_cli.main import main as cli

    from fmt_audit.errors import UnsupportedModelError

    path = save(_two_headed(), tmp_path / "two_heads.onnx")
    loaded = load_model(path)
    assert (loaded.scores, loaded.num_classes) == ("prob", 2)
    # only the Convs the scores depend on are tested and removed: the box head's is another output's
    assert [layer.name for layer in loaded.layers] == ["conv1", "Conv_3", "conv3"]
    assert "boxconv" in [layer.name for layer in load_model(path, "boxes").layers]
    assert "classes      2 (scores: output prob, of 3)" in summarize(loaded).format_text()
    assert (load_model(path, "logits").num_classes, load_model(path, "boxes").num_classes) == (5, 4)
    _audited_end_to_end(path, classes=2)
    from fmt_audit.repair.pipeline import repair

    result = repair(loaded, Dataset(np.random.default_rng(0).random((20, 3, 8, 8), dtype=np.float32),
                                    np.arange(20) % 2), flagged={"conv1": [1]})
    assert [o.name for o in result.model.graph.output] == ["boxes", "prob", "logits"]
    box_weight = [t for t in result.model.graph.initializer if t.name == "boxconv.w"]
    assert box_weight == [t for t in loaded.proto.graph.initializer if t.name == "boxconv.w"]
    from fmt_audit.errors import ConfigError

    other = scan(load_model(path, "logits"), result_data := Dataset(np.random.default_rng(1).random(
        (12, 3, 8, 8), dtype=np.float32), np.arange(12) % 5), ScanConfig(samples=8), verdict=None)
    assert other.model["class_output"] == "logits"
    with pytest.raises(ConfigError, match="give --class-output logits"):
        repair(loaded, result_data, flagged=other)
    runner = CliRunner()
    named = runner.invoke(cli, ["inspect", str(path), "--class-output", "logits"])
    assert named.exit_code == 0 and "classes      5 (scores: output logits, of 3)" in named.output
    unknown = runner.invoke(cli, ["inspect", str(path), "--class-output", "nope"])
    assert unknown.exit_code == 2 and "'nope' is not an output of the model; its outputs: boxes Nx4" in unknown.output
    ambiguous = save(_two_headed("Softmax"), tmp_path / "ambiguous.onnx")
    with pytest.raises(UnsupportedModelError, match="3 outputs .* name them with --class-output NAME"):
        load_model(ambiguous)


def _half(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` in float16: input, output and every stored tensor."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    graph = half.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor).astype(np.float16),
                                                         tensor.name))
    for value in [*graph.input, *graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(half, full_check=True)
    return half


def test_a_float16_graph_is_audited_in_float32_and_repaired_in_float16(tmp_path):
    """Case 6: float16 input and weights, end to end; the repaired graph stays float16."""
    from fmt_audit.repair.pipeline import repair

    path = save(_half(build_synthetic()), tmp_path / "half.onnx")
    loaded = load_model(path)
    assert loaded.image_input.dtype == "float16"
    assert loaded.classifier.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    _audited_end_to_end(path, classes=5)
    data = Dataset(np.random.default_rng(0).random((30, 3, 8, 8), dtype=np.float32), np.arange(30) % 5)
    result = repair(loaded, data, flagged={"conv1": [1]})
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.FLOAT16}
    x = data.x[:4].astype(np.float16)
    session = create_session(result.model, "cpu")
    assert session.run({"x": x})[0].dtype == np.float16
    assert not np.any(onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                                     if t.name == "conv1.w"))[1])


def test_a_lone_output_that_is_not_class_scores_is_refused_in_one_line(tmp_path):
    """An ArgMax label output was read as scores (every prediction class 0) before."""
    from fmt_audit.errors import UnsupportedModelError

    model = build_synthetic()
    model.graph.node.append(helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=0))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    with pytest.raises(UnsupportedModelError,
                       match="only output label N int64 is not class scores; expected float") as caught:
        load_model(save(model, tmp_path / "labels.onnx"))
    assert "\n" not in str(caught.value)
