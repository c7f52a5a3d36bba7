"""HTML reports: self-contained, rendered in a real headless Chromium with no console errors."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SAMPLES, quick_combined
from fmt_audit_cli.main import main

ARTIFACTS = Path(os.environ.get("FMT_AUDIT_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Debian's chromium (.ci/run): there the browser test must run, not skip
needs_chromium = pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true",
                                    reason="no chromium on this machine (CI installs it)")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM, "chromium is not installed (apt-get install chromium)"
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=5000", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("html")
    data = ["--data", str(SAMPLES / "defender.npz")]
    with pytest.MonkeyPatch.context() as monkeypatch:     # the default verdict, its figures, quicker
        quick_combined(monkeypatch)
        scan = CliRunner().invoke(main, ["scan", str(SAMPLES / "badnets_op13.onnx"), *data, "--html",
                                         str(folder / "scan.html"), "--json", str(folder / "scan.json"),
                                         "--verdict-samples", "96"])
    assert scan.exit_code == 0, scan.output
    repair = CliRunner().invoke(main, ["repair", str(SAMPLES / "badnets_op13.onnx"), *data, "--epochs", "2",
                                       "--no-unlearn", "--verdict", "none", "-o", str(folder / "r.onnx"), "--html",
                                       str(folder / "repair.html"), "--from-report", str(folder / "scan.json")])
    assert repair.exit_code == 0, repair.output
    return folder / "scan.html", folder / "repair.html"


def test_reports_are_self_contained(pages):
    for page in pages:
        text = page.read_text()
        assert "<img" in text and "data:image/png;base64," in text
        # nothing fetched from anywhere: no http(s) URLs in src/href attributes
        assert not re.search(r'(src|href)="(https?:)?//', text)
        assert oct(page.stat().st_mode & 0o777) != "0o600"
    scan, repair = (page.read_text() for page in pages)
    # the default scan flags the trace's channels, and says so
    assert re.search(r"[1-9]\d* of 144 channels flagged", scan) and "reversed trigger" in scan
    assert "Channel scores by layer" in scan and "/block" in scan
    assert "Trigger search" in scan and "Untransferred test" in scan and "Smooth-input test" in scan
    assert re.search(r"Removed \d+ of 144 channels", repair) and "Fine-tuning" in repair and "The scan" in repair


@needs_chromium
def test_reports_render_in_chromium_without_console_errors(pages):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for page in pages:
        dom = _chromium("--dump-dom", page.as_uri())
        assert dom.returncode == 0, dom.stderr[-2000:]
        images = page.read_text().count("<img")
        assert f'data-plots-rendered="{images}"' in dom.stdout, "not every plot rendered"
        assert ":CONSOLE(" not in dom.stderr, [line for line in dom.stderr.splitlines() if ":CONSOLE(" in line]
        shot = ARTIFACTS / f"{page.stem}.png"
        taken = _chromium(f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri())
        assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
