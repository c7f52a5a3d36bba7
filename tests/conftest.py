"""Shared fixtures: the bundled sample models and small hand-built ONNX graphs.

The hand-built graphs cover what the exported samples do not: BatchNormalization
kept after a Conv, depthwise and grouped Conv, Conv without bias, unnamed and
duplicate-named nodes, Constant-node weights, Gemm with transB=0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fmt_audit.report.schema import problems
from fmt_audit.verdict import VerdictConfig

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
MANIFEST = json.loads((SAMPLES / "manifest.json").read_text())
SAMPLE_FILES = [entry["file"] for entry in MANIFEST["models"]]
# The verdict's maximum-margin test at a sliver of its default effort (16 starts x 200 steps per class), for
# the tests whose subject is not the verdict: the same code path in a fraction of the time
QUICK_MARGIN = {"margin_restarts": 2, "margin_steps": 10}
QUICK_MARGIN_ARGS = ("--verdict", "margin", "--margin-restarts", "2", "--margin-steps", "10")
QUICK_VERDICT = VerdictConfig(method="margin", **QUICK_MARGIN)


def quick_combined(monkeypatch) -> None:
    """The combined verdict at a sliver of its default effort (a third of the trigger search's steps on half
    its images, a shorter ladder, references trained 150 steps of 400, one warp budget of 20 steps): the same
    code path, quicker."""
    import fmt_audit.verdict.combined
    from fmt_audit.verdict.config import CleanseConfig, ReferenceConfig, UniversalConfig, WarpConfig

    monkeypatch.setattr(VerdictConfig, "cleanse", lambda self: CleanseConfig(steps=100, images=16, seed=self.seed))
    monkeypatch.setattr(VerdictConfig, "warp", lambda self: WarpConfig(budgets=(0.5,), steps=20, images=16,
                                                                       seed=self.seed))
    monkeypatch.setattr(VerdictConfig, "universal", lambda self: UniversalConfig(images=16, steps=8, seed=self.seed))
    monkeypatch.setattr(fmt_audit.verdict.combined, "ReferenceConfig", lambda: ReferenceConfig(steps=150))


@pytest.fixture(autouse=True)
def no_reference_cache_from_the_environment(monkeypatch):
    """A developer's or CI's FMT_AUDIT_CACHE would reach every command a test runs."""
    monkeypatch.delenv("FMT_AUDIT_CACHE", raising=False)


@pytest.fixture(autouse=True)
def reports_match_their_schema(request):
    """Every scan or repair report a test writes into its ``tmp_path`` matches the schema
    (fmt_audit.report.schema, docs/report-schema.md)."""
    yield
    folder = request.node.funcargs.get("tmp_path")
    if folder is None:
        return
    for path in Path(folder).rglob("*.json"):
        try:
            saved = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue    # a test's own broken input
        if isinstance(saved, dict) and "schema_version" in saved:
            assert problems(saved) == [], f"{path.name} does not match the report schema"


def sample_images(name: str = "test.npz", n: int = 64) -> np.ndarray:
    with np.load(SAMPLES / name, allow_pickle=False) as data:
        return (data["x"][:n].astype(np.float32) / 255.0)[:, None]


@pytest.fixture(params=SAMPLE_FILES)
def sample_path(request) -> Path:
    return SAMPLES / request.param


def _init(rng: np.random.Generator, name: str, *shape: int, scale: float = 0.3) -> TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def build_synthetic(opset: int = 13, seed: int = 0, batch: int | str = "N",
                    constant_weight: bool = False) -> onnx.ModelProto:
    """input [N,3,8,8] -> Conv(3->4, BN kept) -> Relu -> depthwise Conv(4, no bias, unnamed)
    -> grouped Conv(4->6, groups 2) -> GlobalAveragePool -> Flatten -> Gemm(transB=0) -> logits [N,5]."""
    rng = np.random.default_rng(seed)
    inits = [
        _init(rng, "conv1.w", 4, 3, 3, 3), _init(rng, "conv1.b", 4),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(4)).astype(np.float32), "bn.scale"),
        _init(rng, "bn.bias", 4, scale=0.1), _init(rng, "bn.mean", 4, scale=0.1),
        numpy_helper.from_array((1 + 0.2 * rng.random(4)).astype(np.float32), "bn.var"),
        _init(rng, "conv3.w", 6, 2, 1, 1), _init(rng, "conv3.b", 6),
        _init(rng, "fc.w", 6, 5), _init(rng, "fc.b", 5),
    ]
    dw_weight = _init(rng, "dw.w", 4, 1, 3, 3)
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b1"],
                         name="bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "dw.w"], ["c2"], group=4, pads=[1, 1, 1, 1]),  # unnamed
        helper.make_node("Relu", ["c2"], ["r2"], name="relu"),  # duplicate name
        helper.make_node("Conv", ["r2", "conv3.w", "conv3.b"], ["c3"], name="conv3", group=2),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], name="fc", transB=0),
    ]
    if constant_weight:
        nodes.insert(0, helper.make_node("Constant", [], ["dw.w"], name="dw_const", value=dw_weight))
    else:
        inits.append(dw_weight)
    graph = helper.make_graph(
        nodes, "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="fmt-audit-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def synthetic() -> onnx.ModelProto:
    return build_synthetic()


def synthetic_images(n: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 8, 8), dtype=np.float32)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path
