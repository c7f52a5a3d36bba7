import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SAMPLES, build_synthetic, save
from fmt_audit_cli.main import main
from onnx import helper


def _invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_inspect_text():
    result = _invoke("inspect", str(SAMPLES / "badnets_op13.onnx"))
    assert result.exit_code == 0, result.output
    assert "conv layers  6, 144 output channels" in result.output
    assert "input 1" not in result.output and "input batchx1x16x16 float32" in result.output
    assert "all ops convert" in result.output


def test_inspect_json_on_opset18_with_external_data():
    result = _invoke("inspect", "--json", "-", str(SAMPLES / "badnets_op18.onnx"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["opsets"] == {"": 18}
    assert summary["image_input"] == {"name": "input", "shape": ["batch", 1, 16, 16], "dtype": "float32",
                                      "layout": "NCHW"}
    assert summary["conv"]["layers"] == 6 and summary["conv"]["channels"] == 144
    assert summary["batchnorm"]["folded"] is True
    assert summary["external_data"] == ["badnets_op18.onnx.data"]
    assert summary["bridge_unsupported_ops"] == []
    assert summary["parameters"] > 10_000


def test_inspect_reports_batchnorm_depthwise_and_unconvertible_ops(tmp_path):
    model = build_synthetic()
    model.graph.node[-1].output[0] = "raw"
    model.graph.node.append(helper.make_node("Hardmax", ["raw"], ["logits"], name="hardmax"))
    path = save(model, tmp_path / "m.onnx")
    summary = json.loads(_invoke("inspect", "--json", "-", str(path)).stdout)
    assert summary["batchnorm"] == {"nodes": 1, "folded": False}
    assert summary["conv"]["depthwise"] == 1 and summary["conv"]["grouped"] == 1
    assert summary["bridge_unsupported_ops"] == ["Hardmax"]
    text = _invoke("inspect", "--layers", str(path)).output
    assert "cannot convert: Hardmax" in text and "depthwise" in text and "Conv_3" in text


@pytest.mark.parametrize(("content", "message"), [
    (None, "not found"),
    (b"garbage", "is not an ONNX model"),
])
def test_bad_model_one_line_exit_2(tmp_path, content, message):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    result = _invoke("inspect", str(path))
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_no_conv_exit_2(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", 1, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", 1, [1, 3, 4, 4])])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    result = _invoke("inspect", str(path))
    assert result.exit_code == 2 and "no 2-D Conv" in result.output


def test_internal_error_exit_3_and_debug_traceback(monkeypatch):
    import fmt_audit.model.inspection

    def broken(model):
        raise RuntimeError("boom")

    monkeypatch.setattr(fmt_audit.model.inspection, "summarize", broken)
    result = _invoke("inspect", str(SAMPLES / "clean_op13.onnx"))
    assert result.exit_code == 3 and "internal error: RuntimeError: boom" in result.output
    result = _invoke("--debug", "inspect", str(SAMPLES / "clean_op13.onnx"))
    assert isinstance(result.exception, RuntimeError)


def test_usage_error_exit_2():
    assert _invoke("inspect").exit_code == 2
    assert _invoke("no-such-command").exit_code == 2


def test_inspect_does_not_import_torch():
    """`inspect` must stay fast: torch and onnx2torch are imported only by commands that need them."""
    code = ("import sys\nfrom click.testing import CliRunner\nfrom fmt_audit_cli.main import main\n"
            f"r = CliRunner().invoke(main, ['inspect', {str(SAMPLES / 'clean_op13.onnx')!r}])\n"
            "assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('torch', 'onnx2torch', 'onnxruntime', 'sklearn') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_console_script_runs():
    script = Path(sys.executable).parent / "fmt-audit"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "inspect" in result.stdout


def test_mask_mode_scan_does_not_import_torch():
    """Mask mode runs in ONNX Runtime alone (without a verdict, whose tests take gradients): it must work where
    the PyTorch bridge is not wanted."""
    code = ("import sys\nfrom click.testing import CliRunner\nfrom fmt_audit_cli.main import main\n"
            f"r = CliRunner().invoke(main, ['scan', {str(SAMPLES / 'clean_op13.onnx')!r}, '--data', "
            f"{str(SAMPLES / 'defender.npz')!r}, '--samples', '8', '--mode', 'mask', '--verdict', 'none'])\n"
            "assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in ('torch', 'onnx2torch', 'onnxruntime') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['onnxruntime']"
