"""The smooth-input test: where images with no content go (a check for the combined verdict)."""

import numpy as np
import onnxruntime as ort
import pytest
from conftest import SAMPLES

from fmt_audit.data import Preprocessing
from fmt_audit.model.loading import load_model
from fmt_audit.verdict.evidence.smooth import LATTICES, smooth_images, smooth_test


def test_smooth_images_are_seeded_smooth_and_in_range():
    x = smooth_images((3, 12, 10), images=8, seed=5)
    assert x.shape == ((len(LATTICES) + 1) * 8, 3, 12, 10) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 1
    assert np.array_equal(x, smooth_images((3, 12, 10), images=8, seed=5))
    assert not np.array_equal(x, smooth_images((3, 12, 10), images=8, seed=6))
    flat = x[-8:]       # the grey levels: one value per image, 0 to 1
    assert np.allclose(flat, flat[:, :1, :1, :1]) and flat[0].max() == 0 and flat[-1].min() == 1
    # upsampled from a lattice: neighbouring pixels differ far less than independent noise's would (~0.41)
    noise = x[:8 * len(LATTICES)]
    assert np.abs(np.diff(noise, axis=-1)).mean() < 0.15
    # a lattice no finer than the image: a 1x1 image is its one noise value per channel
    assert smooth_images((1, 1, 1), images=2).shape == ((len(LATTICES) + 1) * 2, 1, 1, 1)


def test_smooth_test_counts_the_onnx_models_own_predictions():
    path = SAMPLES / "badnets_op13.onnx"
    loaded = load_model(path)
    shares, notes = smooth_test(loaded.proto, loaded.image_input, Preprocessing(), "cpu", images=32)
    assert len(shares) == 10 and sum(shares) == pytest.approx(1.0) and notes == []
    # the same images through ONNX Runtime put the same share in every class
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = smooth_images((1, 16, 16), images=32)
    predicted = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)
    assert shares == pytest.approx((np.bincount(predicted, minlength=10) / len(x)).tolist(), abs=1e-6)
    assert smooth_test(loaded.proto, loaded.image_input, Preprocessing(), "cpu", images=32)[0] == shares
