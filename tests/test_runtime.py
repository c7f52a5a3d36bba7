import numpy as np
import pytest
from conftest import build_synthetic, synthetic_images

from fmt_audit.backends.onnxrt.session import CPU, create_session, cuda_available, run_batched
from fmt_audit.errors import DeviceError


def test_cpu_session_reports_its_provider():
    session = create_session(build_synthetic(), "cpu")
    assert session.provider == CPU and session.device == "cpu"


def test_auto_picks_a_provider_that_really_runs():
    session = create_session(build_synthetic(), "auto")
    assert session.provider == session.session.get_providers()[0]
    assert session.device == ("cuda" if cuda_available() else "cpu") or session.device == "cpu"


@pytest.mark.skipif(cuda_available(), reason="this machine has the CUDA provider")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="CUDA was requested"):
        create_session(build_synthetic(), "cuda")


def test_unknown_device():
    with pytest.raises(DeviceError, match="one of auto, cpu, cuda"):
        create_session(build_synthetic(), "tpu")


def test_batched_run_matches_single_run():
    session = create_session(build_synthetic(), "cpu")
    x = synthetic_images(n=23)
    (whole,) = session.run({"x": x})
    (batched,) = run_batched(session, "x", x, batch_size=5)
    np.testing.assert_allclose(batched, whole, atol=1e-6)


def test_fixed_batch_model_runs_any_count():
    session = create_session(build_synthetic(batch=4), "cpu")
    x = synthetic_images(n=10)
    (out,) = run_batched(session, "x", x, fixed_batch=4)
    reference = create_session(build_synthetic(), "cpu").run({"x": x})[0]
    assert out.shape == (10, 5)
    np.testing.assert_allclose(out, reference, atol=1e-6)
