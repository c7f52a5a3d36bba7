import numpy as np
import pytest
from conftest import SAMPLES

from fmt_audit.data import Preprocessing, load_data, parse_channel_values
from fmt_audit.errors import DataError
from fmt_audit.model.graph import ImageInput

GRAY16 = ImageInput("input", ("batch", 1, 16, 16), "float32")
RGB8 = ImageInput("x", ("N", 3, 8, 8), "float32")


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_sample_npz_grayscale_nhw():
    data = load_data(SAMPLES / "defender.npz", GRAY16, 10)
    assert data.x.shape == (200, 1, 16, 16) and data.x.dtype == np.float32
    assert 0.0 <= data.x.min() and data.x.max() <= 1.0
    assert data.y.dtype == np.int64


def test_uint8_nhwc_becomes_nchw(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    data = load_data(_npz(tmp_path / "d.npz", x=x, y=np.arange(5)), RGB8, 5)
    np.testing.assert_allclose(data.x[2, 1], x[2, :, :, 1] / 255.0, atol=1e-7)


def test_float_nchw_passes_through(tmp_path):
    x = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    data = load_data(_npz(tmp_path / "d.npz", x=x, y=np.zeros(4, np.int64)), RGB8, 5)
    np.testing.assert_array_equal(data.x, x)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"images": np.zeros((2, 8, 8, 3), np.uint8), "y": np.zeros(2, np.int64)}, "missing array"),
    ({"x": np.zeros((2, 8, 8), np.float32), "y": np.zeros(2, np.int64)}, "NCHW"),
    ({"x": np.zeros((2, 8), np.uint8), "y": np.zeros(2, np.int64)}, "NHWC"),
    ({"x": np.full((2, 3, 8, 8), 2.0, np.float32), "y": np.zeros(2, np.int64)}, r"\[0, 1\]"),
    ({"x": np.zeros((2, 8, 8, 3), np.int32), "y": np.zeros(2, np.int64)}, "dtype"),
    ({"x": np.zeros((2, 8, 8, 3), np.uint8), "y": np.zeros(2, np.float32)}, "integer label"),
    ({"x": np.zeros((2, 8, 8, 3), np.uint8), "y": np.zeros(3, np.int64)}, "2 images but 3 labels"),
    ({"x": np.zeros((2, 8, 8, 3), np.uint8), "y": np.array([0, 5])}, "outside the model's 5 classes"),
    ({"x": np.zeros((2, 8, 8, 3), np.uint8), "y": np.array([0, -1])}, ">= 0"),
    ({"x": np.zeros((0, 8, 8, 3), np.uint8), "y": np.zeros(0, np.int64)}, "empty"),
    ({"x": np.zeros((2, 9, 9, 3), np.uint8), "y": np.zeros(2, np.int64)}, "differ"),
    ({"x": np.zeros((2, 8, 8, 1), np.uint8), "y": np.zeros(2, np.int64)}, "channels differ"),
])
def test_bad_npz_is_a_data_error(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        load_data(_npz(tmp_path / "d.npz", **arrays), RGB8, 5)


def test_pickled_object_arrays_are_refused(tmp_path):
    path = _npz(tmp_path / "d.npz", x=np.array([object()], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="no pickle"):
        load_data(path, RGB8, 5)


@pytest.mark.parametrize("payload", [b"", b"not a zip", b"PK\x03\x04broken"])
def test_corrupt_npz(tmp_path, payload):
    path = tmp_path / "d.npz"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="not a readable .npz"):
        load_data(path, RGB8, 5)


def test_missing_and_unknown_data_paths(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "none.npz", RGB8, 5)
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match="expected an .npz"):
        load_data(tmp_path / "d.csv", RGB8, 5)


def _image_folder(root, size=(12, 10)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in (("cat", 2), ("dog", 3)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_image_folder_resized_and_labelled_by_sorted_folder(tmp_path):
    data = load_data(_image_folder(tmp_path / "imgs"), RGB8, 5)
    assert data.x.shape == (5, 3, 8, 8)
    assert data.y.tolist() == [0, 0, 1, 1, 1]


def test_image_folder_grayscale_model(tmp_path):
    data = load_data(_image_folder(tmp_path / "imgs"), GRAY16, 10)
    assert data.x.shape == (5, 1, 16, 16)


def test_unreadable_image_in_folder(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        load_data(root, RGB8, 5)


def test_empty_image_folder(tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="hold no images"):
        load_data(tmp_path / "imgs", RGB8, 5)
    with pytest.raises(DataError, match="no class folders"):
        load_data(tmp_path / "imgs" / "a", RGB8, 5)


def test_preprocessing_normalises_after_scaling():
    prep = Preprocessing(parse_channel_values("0.5,0.25,0"), parse_channel_values("0.5,0.25,1"))
    x = np.ones((1, 3, 2, 2), np.float32)
    np.testing.assert_allclose(prep.apply(x)[0, :, 0, 0], [1.0, 3.0, 1.0])
    assert Preprocessing().apply(x) is x


@pytest.mark.parametrize(("mean", "std", "message"), [
    ("0.5", None, "go together"),
    ("0.5,0.5", "0.5", "2 values but --std has 1"),
    ("0.5", "0", "positive"),
])
def test_preprocessing_validation(mean, std, message):
    with pytest.raises(DataError, match=message):
        Preprocessing(parse_channel_values(mean), parse_channel_values(std, "--std"))


def test_preprocessing_channel_count_checked():
    with pytest.raises(DataError, match="1 or 3 values"):
        Preprocessing((0.1, 0.2), (1.0, 1.0)).check_channels(3)


def test_bad_channel_values_text():
    with pytest.raises(DataError, match="comma-separated numbers"):
        parse_channel_values("0.1;0.2")
    with pytest.raises(DataError, match="finite"):
        parse_channel_values("nan")


def test_take_is_seeded_and_sorted():
    data = load_data(SAMPLES / "defender.npz", GRAY16, 10)
    a, b = data.take(50, seed=3), data.take(50, seed=3)
    np.testing.assert_array_equal(a.y, b.y)
    assert len(a) == 50 and not np.array_equal(a.y, data.take(50, seed=4).y)
