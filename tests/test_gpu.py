"""The GPU path (issue 32): the same engines under ``--device cuda`` (ONNX Runtime's CUDA provider, torch on
CUDA). Runs only where both are present (``pip install -e ".[gpu]"`` on a machine with a GPU); skipped
elsewhere, CI included."""

import numpy as np
import pytest
from conftest import SAMPLES

from fmt_audit.backends.onnxrt.session import cuda_available

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not (cuda_available() and torch.cuda.is_available()),
                                reason="needs ONNX Runtime's CUDA provider and a CUDA build of torch with a GPU")

MODEL, DATA = SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz"


@pytest.fixture(autouse=True)
def _no_tf32():
    """torch may run cuDNN convolutions in TF32: compare float32 with float32."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def _agree(cpu, gpu, samples: int) -> None:
    """Scores within two images of each other (cuDNN may pick other algorithms); flagged sets the same but
    for at most one channel near the threshold."""
    for a, b in zip(cpu.layers, gpu.layers):
        assert np.abs(np.asarray(a.scores) - np.asarray(b.scores)).max() <= 2 / samples + 1e-6, a.name
    flagged_cpu = {(layer, c) for layer, cs in cpu.flagged.items() for c in cs}
    flagged_gpu = {(layer, c) for layer, cs in gpu.flagged.items() for c in cs}
    assert len(flagged_cpu ^ flagged_gpu) <= 1, (flagged_cpu, flagged_gpu)


def test_the_mask_scan_runs_on_the_gpu_and_scores_as_on_the_cpu():
    from fmt_audit.fmt.scan import ScanConfig, scan

    cpu = scan(MODEL, DATA, ScanConfig(samples=64, device="cpu"), verdict=None)
    gpu = scan(MODEL, DATA, ScanConfig(samples=64, device="cuda"), verdict=None)
    assert gpu.config["ort_provider"] == "CUDAExecutionProvider" and gpu.config["device_used"] == "cuda"
    assert gpu.config["whole_graph_layers"] == []       # the cut graph ran on every layer
    _agree(cpu, gpu, 64)


def test_the_gradient_scan_and_the_verdict_run_in_torch_on_the_gpu():
    from fmt_audit.fmt.scan import ScanConfig, scan
    from fmt_audit.verdict import VerdictConfig

    quick = VerdictConfig(method="margin", samples=64, margin_restarts=2, margin_steps=20)
    # eps given: calibrated apart on each device it could land on another rung of the ladder
    gpu = scan(MODEL, DATA, ScanConfig(samples=64, mode="gradient", eps=0.05, device="cuda"), verdict=quick)
    assert gpu.config["placement"]["torch"] == "cuda" and gpu.config["placement"]["onnxruntime"] == "cuda"
    assert gpu.verdict["suspicion"] is not None
    cpu = scan(MODEL, DATA, ScanConfig(samples=64, mode="gradient", eps=0.05, device="cpu"), verdict=None)
    _agree(cpu, gpu, 64)


def test_repair_fine_tunes_on_the_gpu(tmp_path):
    from fmt_audit.fmt.scan import ScanConfig
    from fmt_audit.repair.config import FineTuneConfig, RepairConfig
    from fmt_audit.repair.pipeline import repair

    result = repair(MODEL, DATA, RepairConfig(FineTuneConfig(epochs=1)), ScanConfig(samples=64, device="cuda"))
    assert result.report.verification["checker"] == "passed"
    assert result.report.verification["ort_provider"] == "CUDAExecutionProvider"
    assert result.report.config["placement"]["torch"] == "cuda"
