"""Per-image costs read off the graph, and the batch sizes a memory budget allows."""

import numpy as np
import onnx
import pytest
from conftest import SAMPLES
from onnx import TensorProto, helper, numpy_helper

from fmt_audit.fmt.memory import graph_cost, plan_memory, scan_flops
from fmt_audit.model.graph import conv_layers, with_node_names


def _conv_gemm_graph() -> onnx.ModelProto:
    """input [n,3,8,8] -> Conv 4x3x3x3 pad 1 -> Relu -> Flatten -> Gemm (256 -> 5)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    dense = numpy_helper.from_array(rng.normal(size=(5, 256)).astype(np.float32), "d")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "d"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], [weight, dense])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_flops_and_memory_by_hand():
    cost = graph_cost(_conv_gemm_graph(), 8, 8)
    conv = 2 * (4 * 8 * 8) * (3 * 3 * 3)       # 2 per multiply-add, per output element
    gemm = 2 * 5 * 256
    assert cost.flops == (conv, 0, 0, gemm)
    assert cost.flops_to("conv") == conv and cost.flops_to("fc") == conv + gemm
    # input 768 B + conv out 1 KiB while the conv runs; then the input is freed and the
    # relu's 1 KiB output is made while the conv's is alive: the peak, 2 KiB
    assert cost.peak_bytes == 2 * 4 * 8 * 8 * 4
    assert cost.retained_bytes("fc") == 3 * 1024 + 5 * 4


def test_scan_flops_counts_the_unavoidable_work():
    cost = graph_cost(_conv_gemm_graph(), 8, 8)
    conv = cost.flops[0]
    # per layer 2 forwards to the layer; per channel 1 backward (the layer's own share for one channel)
    # and two full forward passes
    expected = 2 * conv + 4 * (conv // 4 + 2 * cost.total_flops)
    assert scan_flops(cost, [("conv", 4, 4)], samples=1) == expected
    assert scan_flops(cost, [("conv", 4, 4)], samples=10) == 10 * expected
    assert scan_flops(cost, [("conv", 4, 2)], samples=1, steps=3) == 2 * conv + 2 * (
        2 * conv + 3 * (conv // 4) + 2 * cost.total_flops)


def test_costs_of_a_sample_model_follow_its_input_size():
    model = with_node_names(onnx.load(SAMPLES / "badnets_op13.onnx"))
    small, large = graph_cost(model, 16, 16), graph_cost(model, 32, 32)
    convs = [name for name, op in zip(small.names, (n.op_type for n in model.graph.node)) if op == "Conv"]
    assert len(convs) == len(conv_layers(model)) and all(small.flops[small.names.index(c)] > 0 for c in convs)
    for name in convs:   # a Conv's work grows with its output area, 4x
        assert large.flops[large.names.index(name)] == 4 * small.flops[small.names.index(name)]
    assert large.peak_bytes > small.peak_bytes > 0
    last = convs[-1]
    assert large.retained_bytes(last) > large.retained_bytes(convs[0])


def test_memory_plan_follows_the_budget():
    model = with_node_names(onnx.load(SAMPLES / "badnets_op13.onnx"))
    cost = graph_cost(model, 16, 16)
    layers = [layer.name for layer in conv_layers(model)]
    image = 16 * 16 * 4
    roomy = plan_memory(cost, layers, 256, image, 8 * 2**30)
    assert roomy.gradient_batch == 256 and roomy.predict_batch == 256 and roomy.candidate_batch == 4096
    tight = plan_memory(cost, layers, 256, image, 4 * 2**20)
    assert 1 <= tight.gradient_batch < 256 and tight.predict_batch < 256
    assert tight.candidate_batch == 2 * 256       # never below one channel's candidates
    # the kept forward pass stays within its 40% of the budget
    assert tight.gradient_batch * cost.retained_bytes(layers[-1]) * 2 <= 0.4 * 4 * 2**20
    assert plan_memory(cost, layers, 256, image, 8 * 2**30, device="cuda").predict_batch == 2048


@pytest.mark.parametrize("budget", [1.0, 1e9])
def test_plan_is_never_empty(budget):
    cost = graph_cost(_conv_gemm_graph(), 8, 8)
    plan = plan_memory(cost, ["conv"], 3, 768, budget)
    assert plan.gradient_batch >= 1 and plan.predict_batch >= 1 and plan.candidate_batch >= 6
