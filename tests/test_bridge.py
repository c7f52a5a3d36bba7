import numpy as np
import onnx
import pytest
import torch
from conftest import build_synthetic, sample_images, synthetic_images
from onnx import helper, numpy_helper

from fmt_audit.backends.onnxrt.session import create_session
from fmt_audit.backends.torch.bridge import prepare_for_torch, to_torch, write_back
from fmt_audit.backends.torch.ops import live_registry, snapshot, unsupported_ops
from fmt_audit.errors import BridgeError
from fmt_audit.model.graph import conv_layers
from fmt_audit.model.loading import load_model


def _torch_logits(bridge, x):
    with torch.no_grad():
        return bridge.module(torch.from_numpy(x)).numpy()


def _ort_logits(model, x):
    session = create_session(model, "cpu")
    return session.run({session.input_names[0]: x})[0]


def test_snapshot_matches_installed_onnx2torch():
    assert snapshot() == live_registry(), "regenerate with: python -m fmt_audit.backends.torch.ops"


def test_parity_on_every_sample(sample_path):
    model = load_model(sample_path).proto
    x = sample_images(n=64)
    bridge = to_torch(model)
    assert np.abs(_torch_logits(bridge, x) - _ort_logits(model, x)).max() <= 1e-4
    assert set(bridge.conv_modules) == {layer.name for layer in conv_layers(model)}


@pytest.mark.parametrize("constant_weight", [False, True])
def test_parity_on_batchnorm_depthwise_grouped_graph(constant_weight):
    model = build_synthetic(constant_weight=constant_weight)
    x = synthetic_images()
    bridge = to_torch(model)
    assert np.abs(_torch_logits(bridge, x) - _ort_logits(model, x)).max() <= 1e-4
    if constant_weight:
        assert any("Constant" in step for step in bridge.steps)


def test_opset18_graph_is_down_converted():
    model = load_model("sample_models/badnets_op18.onnx").proto
    _, steps = prepare_for_torch(model)
    assert any("opset 18 -> 17" in step for step in steps)
    assert any("allowzero" in step for step in steps)


def _dynamic_view_graph(batch_piece: str) -> onnx.ModelProto:
    """Conv -> global mean -> ``view(x.size(0), -1)`` as torch's dynamo exporter writes it: a Reshape with
    ``allowzero=1`` whose shape is a Concat of the batch size (``batch_piece``: ``"batch"`` from the input's
    Shape cut to its first dimension, ``"channels"`` from its second) and a Constant of ``value_ints``."""
    rng = np.random.default_rng(0)
    start, end = (0, 1) if batch_piece == "batch" else (1, 2)
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["conv"], ["mean"], axes=[2, 3], keepdims=1),
        helper.make_node("Shape", ["input"], ["shape"], start=start, end=end),
        helper.make_node("Squeeze", ["shape"], ["size"]),
        helper.make_node("Constant", [], ["minus_one"], value_ints=[-1]),
        helper.make_node("Reshape", ["size", "minus_one"], ["size_1d"]),
        helper.make_node("Constant", [], ["width"], value_ints=[4]),
        helper.make_node("Concat", ["size_1d", "width"], ["target"], axis=0),
        helper.make_node("Reshape", ["mean", "target"], ["flat"], allowzero=1),
        helper.make_node("Gemm", ["flat", "fc", "bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "dynamic_view", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "fc"),
         numpy_helper.from_array(np.zeros(3, np.float32), "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_view_by_the_batch_size_converts_and_one_by_another_size_is_refused():
    model = _dynamic_view_graph("batch")
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(1).random((5, 3, 8, 8), dtype=np.float32)
    bridge = to_torch(model)
    assert "relaxed allowzero on 1 Reshape nodes" in bridge.steps
    assert np.abs(_torch_logits(bridge, x) - _ort_logits(model, x)).max() <= 1e-5
    # an entry taken from another dimension may be 0 as far as the graph says: allowzero must stay
    with pytest.raises(BridgeError, match="allowzero"):
        to_torch(_dynamic_view_graph("channels"))


def _initializers(model):
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


def test_round_trip_without_changes_is_byte_identical(sample_path):
    model = load_model(sample_path).proto
    restored = write_back(model, to_torch(model))
    assert restored.SerializeToString() == model.SerializeToString()


def test_round_trip_byte_identical_with_constant_node_weights():
    model = build_synthetic(constant_weight=True)
    assert write_back(model, to_torch(model)).SerializeToString() == model.SerializeToString()


def test_every_trainable_tensor_is_tied_to_an_onnx_tensor():
    bridge = to_torch(build_synthetic())
    trainable = {name for name, p in bridge.module.named_parameters() if p.requires_grad}
    assert trainable <= set(bridge.sources)
    tied = {source.tensor for source in bridge.sources.values()}
    assert {"conv1.w", "conv1.b", "dw.w", "conv3.w", "fc.w", "fc.b",
            "bn.scale", "bn.bias", "bn.mean", "bn.var"} <= tied


def _train_a_little(bridge, x, steps=3):
    bridge.module.train()
    optimizer = torch.optim.SGD(bridge.module.parameters(), lr=0.05)
    target = torch.zeros(len(x), dtype=torch.long)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(bridge.module(torch.from_numpy(x)), target).backward()
        optimizer.step()
    bridge.module.eval()


@pytest.mark.parametrize("build", ["synthetic", "badnets_op13", "badnets_op18"])
def test_write_back_after_training_matches_torch(build):
    if build == "synthetic":
        model, x = build_synthetic(), synthetic_images()
    else:
        model, x = load_model(f"sample_models/{build}.onnx").proto, sample_images(n=32)
    bridge = to_torch(model)
    _train_a_little(bridge, x)
    layer = conv_layers(model)[0]
    with torch.no_grad():  # zero one output channel, as repair will
        conv = bridge.conv_weights(layer.name)
        conv.weight[0].zero_()
        if conv.bias is not None:
            conv.bias[0] = 0.0
    updated = write_back(model, bridge)
    onnx.checker.check_model(updated, full_check=True)
    assert np.abs(_ort_logits(updated, x) - _torch_logits(bridge, x)).max() <= 1e-4
    # structure untouched: same nodes, names, opset and metadata; only tensor values change
    assert [n.SerializeToString() for n in updated.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert list(updated.opset_import) == list(model.opset_import)
    assert (updated.producer_name, updated.ir_version) == (model.producer_name, model.ir_version)
    assert [t.name for t in updated.graph.initializer] == [t.name for t in model.graph.initializer]
    weight = {t.name: numpy_helper.to_array(t) for t in updated.graph.initializer}[layer.weight]
    assert np.all(weight[0] == 0)
    assert _initializers(updated) != _initializers(model)


def test_batchnorm_statistics_written_back_after_train_mode():
    model = build_synthetic()
    bridge = to_torch(model)
    _train_a_little(bridge, synthetic_images(n=32))
    updated = write_back(model, bridge)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in updated.graph.initializer}
    assert not np.array_equal(before["bn.mean"], after["bn.mean"])
    np.testing.assert_allclose(after["bn.var"], bridge.module.state_dict()["bn1.running_var"].numpy())


def test_unsupported_op_is_named():
    model = build_synthetic()
    hardmax = helper.make_node("Hardmax", ["logits_raw"], ["logits"], name="hardmax")
    model.graph.node[-1].output[0] = "logits_raw"
    model.graph.node.append(hardmax)
    assert unsupported_ops(model) == ["Hardmax"]
    with pytest.raises(BridgeError, match="cannot convert these ops: Hardmax"):
        to_torch(model)


def test_custom_domain_op_is_unsupported():
    model = build_synthetic()
    model.graph.node[2].domain = "com.vendor"
    model.opset_import.append(helper.make_opsetid("com.vendor", 1))
    assert unsupported_ops(model) == ["com.vendor::Relu"]


def _exported_with_shared_biases() -> onnx.ModelProto:
    """torch's legacy exporter on Conv+BN pairs with fresh BatchNorms: the folded biases are equal, so it
    stores one tensor and gives every further Conv an Identity of it (a pattern onnx2torch cannot read)."""
    import io

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
                              torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1, bias=False),
                              torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 10)).eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, torch.zeros(1, 1, 16, 16), buffer, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=13, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def test_identity_copies_of_stored_tensors_convert_and_take_their_own_values():
    model = _exported_with_shared_biases()
    identities = [n for n in model.graph.node if n.op_type == "Identity"]
    assert identities, "the exporter no longer shares tensors through Identity: this test needs another model"
    bridge = to_torch(model)
    assert any("Identity" in step for step in bridge.steps)
    x = sample_images(n=16)
    assert np.abs(_ort_logits(model, x) - _torch_logits(bridge, x)).max() <= 1e-4
    with torch.no_grad():   # the two Convs' biases, once one shared tensor, now differ
        for i, layer in enumerate(conv_layers(model)):
            bridge.conv_weights(layer.name).bias += 0.1 * (i + 1)
    updated = write_back(model, bridge)
    onnx.checker.check_model(updated, full_check=True)
    assert np.abs(_ort_logits(updated, x) - _torch_logits(bridge, x)).max() <= 1e-4
    assert len([n for n in updated.graph.node if n.op_type == "Identity"]) < len(identities)


def test_a_tensor_read_directly_by_several_nodes_is_split_when_their_values_part():
    """The dynamo exporter stores equal tensors once: a fresh BatchNorm's bias and running mean (zeros), its
    weight and running variance (ones), read by the same node. Training moves them apart; the write-back
    gives each reader whose value now differs its own ``NAME.k`` tensor."""
    import tempfile
    from pathlib import Path

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.BatchNorm2d(4),
                              torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 10)).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.onnx"
        torch.onnx.export(net, (torch.zeros(2, 1, 16, 16),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("n")},), dynamo=True)
        model = onnx.load(str(path))
    norm = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    assert len(set(norm.input[1:])) < 4, "the exporter no longer shares equal tensors: this test needs another"
    bridge = to_torch(model)
    x = sample_images(n=16)
    module = next(m for m in bridge.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():   # as training would: parameters and running statistics move apart
        module.bias += 0.3
        module.running_var *= 1.5
    updated = write_back(model, bridge)
    onnx.checker.check_model(updated, full_check=True)
    assert np.abs(_ort_logits(updated, x) - _torch_logits(bridge, x)).max() <= 1e-4
    renamed = next(n for n in updated.graph.node if n.op_type == "BatchNormalization").input[1:]
    assert len(set(renamed)) == 4
    assert all(name in norm.input or name.rsplit(".", 1)[0] in norm.input for name in renamed)


def _unfreeable() -> onnx.ModelProto:
    """A Reshape [1, -1] after a Transpose that moved the batch off axis 0: freeing its target would read
    the channels as the batch."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
             numpy_helper.from_array(rng.standard_normal((5, 256)).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c"], ["t"], name="swap", perm=[1, 0, 2, 3]),
             helper.make_node("Reshape", ["t", "shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_fixed_batch_that_cannot_be_freed_is_converted_as_it_is():
    """The freed module of :func:`_unfreeable` fails the image-by-image check, and the bridge falls back to
    the graph as exported (which then runs at its batch size only)."""
    from fmt_audit.backends.torch.bridge import check_free_batch
    from fmt_audit.errors import UnsupportedModelError
    from fmt_audit.model.graph import image_input

    model = _unfreeable()
    _, steps = prepare_for_torch(model)
    assert any(step.startswith("freed") for step in steps)     # the rewrite is tried ...
    bridge = to_torch(model)
    assert not any(step.startswith("freed") for step in bridge.steps)   # ... and dropped
    x = np.random.default_rng(1).random((1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ours = bridge.module(torch.from_numpy(x)).numpy()
    assert np.abs(ours - _ort_logits(model, x)).max() <= 1e-4
    with pytest.raises(UnsupportedModelError, match="fixed to batch size 1"):
        check_free_batch(bridge, image_input(model), "fine-tuning")


def test_onnx_runtime_runs_a_batch_one_graph_in_larger_batches_only_when_images_stay_independent():
    """torch exports a fixed batch of 1 by default; the mask scan then ran one image per ONNX Runtime call.
    Freed where the freed graph gives every image its own scores (same scan scores), kept where not."""
    from fmt_audit.backends.onnxrt.masked import MaskedModel
    from fmt_audit.backends.onnxrt.session import OrtClassifier, with_free_batch

    fixed = build_synthetic(batch=1)
    assert MaskedModel(fixed, "cpu").batch_size == 256 and OrtClassifier(fixed, "cpu").fixed_batch is None
    x = synthetic_images(n=7)
    freed_logits = MaskedModel(fixed, "cpu").run(x)[0]
    assert np.abs(freed_logits - np.concatenate([_ort_logits(fixed, x[i:i + 1]) for i in range(7)])).max() <= 1e-5
    unfreeable = _unfreeable()
    assert with_free_batch(unfreeable) is unfreeable
    assert MaskedModel(unfreeable, "cpu").batch_size == 1


@pytest.mark.parametrize("build", ["synthetic", "badnets_op13"])    # the sample: Flatten of a Conv's maps -> Gemm
def test_a_cpu_module_runs_channels_last_where_a_probe_agrees_and_writes_back_the_same_graph(monkeypatch, build):
    import fmt_audit.backends.torch.bridge as bridge_module
    from fmt_audit.backends.torch.bridge import BridgedClassifier
    from fmt_audit.data import Preprocessing

    if build == "synthetic":
        model, x = build_synthetic(), synthetic_images()
    else:
        model, x = load_model(f"sample_models/{build}.onnx").proto, sample_images(n=32)
    logits = {}
    for enabled in (False, True):
        monkeypatch.setattr(bridge_module, "CHANNELS_LAST_ON_CPU", enabled)
        bridge = to_torch(model)
        classifier = BridgedClassifier(bridge, Preprocessing(), "cpu")
        expected = torch.channels_last if enabled else torch.contiguous_format
        assert classifier.memory_format is expected and bridge.memory_formats == {"cpu": expected}
        # a filter whose two orders differ in memory (not one input channel, not 1x1)
        conv = next(w for w in (bridge.conv_weights(layer.name).weight for layer in conv_layers(model))
                    if w.shape[1] > 1 and w.shape[2] * w.shape[3] > 1)
        assert conv.is_contiguous(memory_format=expected) and conv.is_contiguous() is not enabled
        logits[enabled] = classifier.logits(x)
        _train_a_little(bridge, x)      # weights and their gradients in that order, written back as ONNX's
        updated = write_back(model, bridge)
        assert np.abs(_ort_logits(updated, x) - _torch_logits(bridge, x)).max() <= 1e-4
    assert np.abs(logits[True] - logits[False]).max() <= 1e-5


def test_a_module_that_cannot_run_channels_last_stays_in_the_default_order():
    from fmt_audit.backends.torch.bridge import BridgedClassifier
    from fmt_audit.data import Preprocessing

    model, x = build_synthetic(), synthetic_images()
    bridge = to_torch(model)
    strides = {name: p.stride() for name, p in bridge.module.named_parameters()}

    def refuse(_module, inputs):
        if not inputs[0].is_contiguous():
            raise RuntimeError("view size is not compatible with input tensor's size and stride")

    bridge.module.register_forward_pre_hook(refuse)
    bridge.module.train()
    classifier = BridgedClassifier(bridge, Preprocessing(), "cpu")
    assert classifier.memory_format is torch.contiguous_format
    assert {name: p.stride() for name, p in bridge.module.named_parameters()} == strides     # as found
    assert bridge.module.training
    assert np.abs(classifier.logits(x) - _ort_logits(model, x)).max() <= 1e-4


def test_a_module_whose_logits_move_in_channels_last_stays_in_the_default_order(monkeypatch):
    import fmt_audit.backends.torch.bridge as bridge_module
    from fmt_audit.backends.torch.bridge import BridgedClassifier
    from fmt_audit.data import Preprocessing

    monkeypatch.setattr(bridge_module, "LAYOUT_TOLERANCE", -1.0)     # no gap is small enough
    bridge = to_torch(build_synthetic())
    strides = {name: p.stride() for name, p in bridge.module.named_parameters()}
    classifier = BridgedClassifier(bridge, Preprocessing(), "cpu")
    assert classifier.memory_format is torch.contiguous_format and bridge.memory_format_name("cpu") == "contiguous"
    assert {name: p.stride() for name, p in bridge.module.named_parameters()} == strides
