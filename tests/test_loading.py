import numpy as np
import onnx
import pytest
from conftest import MANIFEST, SAMPLES, build_synthetic, save
from onnx import TensorProto, helper, numpy_helper

from fmt_audit.errors import ModelLoadError, UnsupportedModelError
from fmt_audit.model.loading import load_model


def test_loads_every_sample(sample_path):
    model = load_model(sample_path)
    entry = next(m for m in MANIFEST["models"] if m["file"] == sample_path.name)
    assert model.image_input.name == "input"
    assert model.image_input.shape[1:] == (1, 16, 16) and model.image_input.batch is None
    assert model.num_classes == 10
    assert len(model.layers) == 6 and sum(layer.out_channels for layer in model.layers) == 144
    assert model.external_data == ((entry["external_data"],) if entry["external_data"] else ())
    assert len(model.sha256) == 64


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.onnx")


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a file"):
        load_model(tmp_path)


@pytest.mark.parametrize("payload", [b"", b"hello, not onnx", np.random.default_rng(0).bytes(64)],
                         ids=["empty", "text", "random"])     # fixed bytes: every pytest-xdist worker collects the same
def test_not_a_protobuf(tmp_path, payload):
    path = tmp_path / "bad.onnx"
    path.write_bytes(payload)
    with pytest.raises(ModelLoadError, match="not .*ONNX"):
        load_model(path)


def test_truncated_model(tmp_path):
    data = (SAMPLES / "clean_op13.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        load_model(path)


def test_checker_failure_is_a_load_error(tmp_path):
    model = build_synthetic()
    model.graph.node[2].input[0] = "does_not_exist"
    with pytest.raises(ModelLoadError, match="checker"):
        load_model(save(model, tmp_path / "dangling.onnx"))


def _with_external_data(tmp_path, location: str):
    folder = tmp_path / "model"
    folder.mkdir()
    model = build_synthetic()
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    stored = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in stored.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(stored, str(folder / "m.onnx"))
    return folder


def test_external_data_inside_folder_loads(tmp_path):
    folder = _with_external_data(tmp_path, "weights.bin")
    model = load_model(folder / "m.onnx")
    assert model.external_data == ("weights.bin",)
    reference = build_synthetic()
    got = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer}
    for tensor in reference.graph.initializer:
        np.testing.assert_array_equal(got[tensor.name], numpy_helper.to_array(tensor))


@pytest.mark.parametrize("location", ["/etc/passwd", "../weights.bin", "sub/../../weights.bin"])
def test_external_data_outside_folder_refused(tmp_path, location):
    folder = _with_external_data(tmp_path, location)
    (tmp_path / "weights.bin").write_bytes((folder / "weights.bin").read_bytes())
    with pytest.raises(ModelLoadError, match="refused"):
        load_model(folder / "m.onnx")


def test_external_data_symlink_out_of_folder_refused(tmp_path):
    folder = _with_external_data(tmp_path, "link.bin")
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes((folder / "weights.bin").read_bytes())
    (folder / "link.bin").symlink_to(outside)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(folder / "m.onnx")


def test_missing_external_data_file(tmp_path):
    folder = _with_external_data(tmp_path, "weights.bin")
    (folder / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(folder / "m.onnx")


def _tiny(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_no_conv(tmp_path):
    model = _tiny([helper.make_node("Relu", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    with pytest.raises(UnsupportedModelError, match="no 2-D Conv"):
        load_model(save(model, tmp_path / "m.onnx"))


def test_no_4d_float_input(tmp_path):
    model = _tiny([helper.make_node("Relu", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    with pytest.raises(UnsupportedModelError, match="no 4-D float image input"):
        load_model(save(model, tmp_path / "m.onnx"))


def test_integer_image_input(tmp_path):
    model = _tiny([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                  [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    with pytest.raises(UnsupportedModelError, match="no 4-D float image input"):
        load_model(save(model, tmp_path / "m.onnx"))


def test_several_image_inputs(tmp_path):
    weight = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    model = _tiny([helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Conv", ["s", "w"], ["y"])],
                  [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8, 8]) for n in "ab"],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], [weight])
    with pytest.raises(UnsupportedModelError, match="several image inputs"):
        load_model(save(model, tmp_path / "m.onnx"))
