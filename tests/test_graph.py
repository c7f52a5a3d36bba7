from conftest import build_synthetic
from onnx import helper

from fmt_audit.model.graph import conv_layers, image_input, node_names, with_node_names


def test_node_names_are_unique_stable_and_keep_given_names():
    model = build_synthetic()
    names = node_names(model.graph)
    assert len(set(names)) == len(names) == len(model.graph.node)
    assert names[0] == "conv1"
    assert names[3] == "Conv_3"             # unnamed node: op type and position
    assert names[2] == "relu" and names[4] == "relu__1"  # duplicate name made unique
    assert node_names(model.graph) == names  # stable


def test_generated_name_never_collides_with_a_given_one():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="Relu_1"), helper.make_node("Relu", ["a"], ["b"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("b", 1, [1])])
    assert node_names(graph) == ["Relu_1", "Relu_1__1"]


def test_with_node_names_leaves_the_original_untouched():
    model = build_synthetic()
    named = with_node_names(model)
    assert model.graph.node[3].name == ""
    assert named.graph.node[3].name == "Conv_3"


def test_conv_layers_in_execution_order_with_groups():
    layers = conv_layers(build_synthetic())
    assert [layer.name for layer in layers] == ["conv1", "Conv_3", "conv3"]
    conv1, dw, grouped = layers
    assert (conv1.out_channels, conv1.groups, conv1.depthwise, conv1.bias) == (4, 1, False, "conv1.b")
    assert dw.depthwise and dw.bias is None and dw.in_channels == 4
    assert grouped.grouped and not grouped.depthwise and grouped.out_channels == 6


def test_conv_layers_read_constant_node_weights():
    layers = conv_layers(build_synthetic(constant_weight=True))
    assert [layer.name for layer in layers] == ["conv1", "Conv_4", "conv3"]
    assert all(layer.weight_stored for layer in layers)


def test_image_input_reports_dynamic_batch():
    spec = image_input(build_synthetic())
    assert (spec.name, spec.batch, spec.channels, spec.height, spec.width) == ("x", None, 3, 8, 8)
    assert image_input(build_synthetic(batch=1)).batch == 1
