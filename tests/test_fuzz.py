"""Property-based fuzzing of the CLI on mutated sample models and data files.

Every run must end with exit code 0, or 2 and a one-line message: never an
uncaught exception (exit 3 or a traceback). Commands run in-process through
click's test runner, so hundreds of cases fit in a minute. Cases are
derandomized (the same in every CI run); ``benchmarks/fuzz.py`` runs many more,
randomly, with ``FMT_AUDIT_FUZZ_EXAMPLES`` and ``FMT_AUDIT_FUZZ_RANDOM=1``.
"""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import onnx
from click.testing import CliRunner
from conftest import QUICK_MARGIN_ARGS, SAMPLES
from fmt_audit_cli.main import main
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FMT_AUDIT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(deadline=None, database=None, derandomize=os.environ.get("FMT_AUDIT_FUZZ_RANDOM") != "1",
                suppress_health_check=list(HealthCheck), print_blob=True)


def cases(count: int) -> settings:
    """``count`` cases in CI (1,400 in all, about 40 s on 2 cores); FMT_AUDIT_FUZZ_EXAMPLES overrides."""
    return settings(FUZZ, max_examples=EXAMPLES or count)
MODEL_BYTES = (SAMPLES / "clean_op13.onnx").read_bytes()
DATA_BYTES = (SAMPLES / "defender.npz").read_bytes()     # compressed: most flips break a checksum


def _uncompressed(n: int = 8) -> bytes:
    """The first images of the defender set, stored plainly: flips land in pixels, labels and headers."""
    with np.load(SAMPLES / "defender.npz", allow_pickle=False) as data:
        buffer = io.BytesIO()
        np.savez(buffer, x=data["x"][:n], y=data["y"][:n])
    return buffer.getvalue()


PLAIN_DATA_BYTES = _uncompressed()
# a quick scan: mask mode, 2 images, the first Conv layer only (the others match 'block')
QUICK_SCAN = ["--samples", "2", "--skip-layers", "block", "--mode", "mask", *QUICK_MARGIN_ARGS]


def _check(result, record: bool = True) -> None:
    """Exit 0, or exit 2 with exactly one line and no traceback."""
    if record:   # --hypothesis-show-statistics shows how many runs got how far
        event(f"exit {result.exit_code}")
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    if result.exit_code == 2:
        assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output


def _run(*args, record: bool = True) -> None:
    _check(CliRunner().invoke(main, [str(a) for a in args]), record)


# -- raw bytes ------------------------------------------------------------------------------------------------

byte_edits = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=8)


def _mutated(payload: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(payload)
    for position, value in edits:
        data[position % len(data)] = value
    return bytes(data[:cut % len(data)] if cut is not None else data)


@cases(400)
@given(edits=byte_edits, cut=st.none() | st.integers(0, 2**31))
def test_model_bytes(tmp_path_factory, edits, cut):
    path = tmp_path_factory.mktemp("m") / "m.onnx"
    path.write_bytes(_mutated(MODEL_BYTES, edits, cut))
    _run("inspect", path)


@cases(300)
@given(edits=byte_edits, cut=st.none() | st.integers(0, 2**31), plain=st.booleans())
def test_data_bytes(tmp_path_factory, edits, cut, plain):
    path = tmp_path_factory.mktemp("d") / "d.npz"
    path.write_bytes(_mutated(PLAIN_DATA_BYTES if plain else DATA_BYTES, edits, cut))
    _run("scan", SAMPLES / "clean_op13.onnx", "--data", path, *QUICK_SCAN)


# -- parsed protobuf fields -----------------------------------------------------------------------------------

OPS = ["Conv", "Relu", "Add", "Gemm", "MatMul", "Identity", "Flatten", "Reshape", "MaxPool", "Sigmoid", "Loop",
       "NoSuchOp", ""]


def _edit_model(model: onnx.ModelProto, kind: int, index: int, value: int) -> None:
    graph = model.graph
    node = graph.node[index % len(graph.node)]
    if kind == 0:      # an input dimension: zero, negative, absurd, symbolic
        dim = graph.input[0].type.tensor_type.shape.dim[index % 4]
        dim.Clear()
        if value % 5 == 4:
            dim.dim_param = "free"
        else:
            dim.dim_value = [0, -1, 2**40, 1, value][value % 5]
    elif kind == 1:    # an op type
        node.op_type = OPS[value % len(OPS)]
    elif kind == 2:    # a node removed
        graph.node.remove(node)
    elif kind == 3:    # an initializer removed
        if graph.initializer:
            graph.initializer.remove(graph.initializer[index % len(graph.initializer)])
    elif kind == 4:    # an input rewired: dangling, or to a later value (a cycle)
        if node.input:
            later = graph.node[(index + 1 + value) % len(graph.node)].output[0]
            node.input[value % len(node.input)] = later if value % 2 else f"dangling_{value}"
    elif kind == 5:    # an integer attribute
        ints = [a for a in node.attribute if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)]
        if ints:
            attribute = ints[value % len(ints)]
            if attribute.type == onnx.AttributeProto.INT:
                attribute.i = [0, -3, 2**31 - 1, 7][value % 4]
            elif attribute.ints:
                attribute.ints[value % len(attribute.ints)] = [0, -3, 2**31 - 1, 7][value % 4]
    elif kind == 6:    # an initializer's dims or element type
        if graph.initializer:
            tensor = graph.initializer[index % len(graph.initializer)]
            if value % 2 and tensor.dims:
                tensor.dims[value % len(tensor.dims)] = [0, 1, 3, 2**33][value % 4]
            else:
                tensor.data_type = value % 17
    elif kind == 7:    # the opset
        model.opset_import[0].version = value % 30
    elif kind == 8:    # a duplicate node (two producers of one value)
        graph.node.append(node)
    elif kind == 9:    # the image input's element type
        graph.input[0].type.tensor_type.elem_type = value % 17


@cases(300)
@given(edits=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 500), st.integers(0, 2**16)),
                      min_size=1, max_size=3))
def test_model_fields(tmp_path_factory, edits):
    model = onnx.load_from_string(MODEL_BYTES)
    for kind, index, value in edits:
        _edit_model(model, kind, index, value)
    path = tmp_path_factory.mktemp("f") / "m.onnx"
    try:
        path.write_bytes(model.SerializeToString())
    except Exception:   # protobuf itself refuses this edit: nothing to feed the tool
        return
    _run("inspect", path)
    _run("scan", path, "--data", SAMPLES / "defender.npz", *QUICK_SCAN)


# -- array contents of data files ---------------------------------------------------------------------------------

DTYPES = [np.uint8, np.float32, np.float64, np.float16, np.int16, np.int64, np.bool_]


@st.composite
def arrays(draw, labels: bool):
    if draw(st.booleans()):   # half the cases near valid data: the shapes and types the sample model takes
        dtype = np.int64 if labels else draw(st.sampled_from([np.uint8, np.float32]))
        count = draw(st.integers(2, 4))
        return draw(st.sampled_from([np.zeros, np.ones]))([count] if labels else [count, 16, 16], dtype)
    dtype = draw(st.sampled_from(DTYPES))
    default = [draw(st.integers(0, 4))] if labels else [draw(st.integers(0, 4)), 16, 16]
    shape = draw(st.one_of(st.just(default), st.lists(st.integers(0, 17), min_size=0, max_size=5)))
    values = draw(st.sampled_from(["zeros", "ones", "big", "nan", "random"]))
    size = int(np.prod(shape)) if shape else 1
    if values == "random":
        data = np.random.default_rng(draw(st.integers(0, 99))).uniform(-2, 300, size)
    else:
        data = np.full(size, {"zeros": 0, "ones": 1, "big": 1e6, "nan": np.nan}[values])
    with np.errstate(invalid="ignore", over="ignore"):
        return data.astype(dtype).reshape(shape)


@cases(400)
@given(x=arrays(labels=False), y=arrays(labels=True),
       keys=st.sampled_from([("x", "y"), ("x", "y"), ("x",), ("images", "y")]))
def test_data_arrays(tmp_path_factory, x, y, keys):
    buffer = io.BytesIO()
    np.savez(buffer, **dict(zip(keys, (x, y))))
    path = tmp_path_factory.mktemp("a") / "d.npz"
    path.write_bytes(buffer.getvalue())
    _run("scan", SAMPLES / "clean_op13.onnx", "--data", path, *QUICK_SCAN)


def test_a_zip_of_other_things_is_not_data(tmp_path):
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"not an array")
        archive.writestr("y.npy", b"\x93NUMPY")
    _run("scan", SAMPLES / "clean_op13.onnx", "--data", path, *QUICK_SCAN, record=False)
