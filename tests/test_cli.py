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


def token_combined_counting_references(monkeypatch) -> list:
    """The combined verdict's code path at a token effort (what is tested is where its references come from);
    the seeds of the reference networks trained from now on."""
    import fmt_audit.verdict.combined
    from fmt_audit.verdict import VerdictConfig
    from fmt_audit.verdict.config import CleanseConfig, ReferenceConfig, UniversalConfig
    from fmt_audit.verdict.evidence import transfer

    monkeypatch.setattr(VerdictConfig, "cleanse", lambda self: CleanseConfig(steps=5, images=8, patience=5))
    monkeypatch.setattr(VerdictConfig, "universal", lambda self: UniversalConfig(images=8, steps=2))
    monkeypatch.setattr(fmt_audit.verdict.combined, "ReferenceConfig", lambda: ReferenceConfig(steps=10))
    trained = []
    original = transfer.train_reference
    monkeypatch.setattr(transfer, "train_reference", lambda *a: trained.append(a[-1]) or original(*a))
    return trained


CACHED_SCAN = ["scan", str(SAMPLES / "badnets_op13.onnx"), "--data", str(SAMPLES / "defender.npz"), "--samples", "16",
               "--skip-layers", "block", "--verdict-samples", "64"]


def test_a_reference_cache_trains_the_verdicts_references_once_across_commands(monkeypatch, tmp_path):
    """--cache DIR (or FMT_AUDIT_CACHE) keeps the combined verdict's reference networks: a second scan on the same
    images trains none and reports what the first did; an existing file in place of DIR is a usage error."""
    trained = token_combined_counting_references(monkeypatch)
    cache = tmp_path / "cache"
    first = CliRunner().invoke(main, [*CACHED_SCAN, "--cache", str(cache), "--json", str(tmp_path / "a.json")])
    assert first.exit_code == 0, first.output
    assert len(trained) == 3 and len(list(cache.glob("*.npz"))) == 1
    second = CliRunner().invoke(main, [*CACHED_SCAN, "--json", str(tmp_path / "b.json")],
                                env={"FMT_AUDIT_CACHE": str(cache)})
    assert second.exit_code == 0, second.output
    assert len(trained) == 3
    reports = [json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json")]
    for report in reports:
        report.pop("timing"), report.pop("resources")      # seconds, and the memory free at the time
    assert reports[0] == reports[1] and reports[0]["verdict"]["suspicion"] is not None
    (tmp_path / "file").write_text("")
    refused = CliRunner().invoke(main, [*CACHED_SCAN, "--cache", str(tmp_path / "file")])
    assert refused.exit_code == 2 and "is a file" in refused.output
    refused = CliRunner().invoke(main, [*CACHED_SCAN, "--cache", str(tmp_path / "file" / "under")])
    assert refused.exit_code == 2 and "--cache" in refused.output and "cannot make the folder" in refused.output
    assert "Traceback" not in refused.output


@pytest.mark.slow
def test_a_repair_after_a_scan_with_the_same_cache_trains_no_references(monkeypatch, tmp_path):
    """A scan, then a repair of its flagged channels, with one --cache: the self-check's verdict on the repaired
    model takes the scan's reference networks (the images are the same sample of the same file)."""
    trained = token_combined_counting_references(monkeypatch)
    cache = tmp_path / "cache"
    scanned = CliRunner().invoke(main, [*CACHED_SCAN, "--cache", str(cache), "--json", str(tmp_path / "a.json")])
    assert scanned.exit_code == 0, scanned.output
    assert len(trained) == 3
    repaired = CliRunner().invoke(main, ["repair", *CACHED_SCAN[1:], "--from-report", str(tmp_path / "a.json"),
                                         "--epochs", "1", "--cache", str(cache), "-o", str(tmp_path / "r.onnx")])
    assert repaired.exit_code == 0, repaired.output
    assert len(trained) == 3 and "self-check" in repaired.output
