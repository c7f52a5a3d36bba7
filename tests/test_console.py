"""The CLI's output channels (report to stdout, summary to stderr, -q, -v) and --config files."""

import json

from click.testing import CliRunner
from conftest import QUICK_MARGIN_ARGS, QUICK_VERDICT, SAMPLES
from fmt_audit_cli.main import main

MODEL_AND_DATA = [str(SAMPLES / "badnets_op13.onnx"), "--data", str(SAMPLES / "defender.npz"), "--samples", "16"]
SCAN = ["scan", *MODEL_AND_DATA, "--skip-layers", "block", *QUICK_MARGIN_ARGS]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_json_to_stdout_owns_stdout():
    result = _run(*SCAN, "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)       # nothing but the report on stdout
    assert report["summary"]["channels_tested"] == 16
    assert "channels flagged" in result.stderr


def test_quiet_prints_nothing_and_verbose_logs_the_steps():
    quiet = _run("-q", *SCAN)
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    verbose = _run("-v", *SCAN, "--mode", "gradient", "--steps", "1")
    assert verbose.exit_code == 0 and "scanning 16 channels in 1 layers on 16 images" in verbose.stderr
    assert "calibrated eps" in verbose.stderr and "channels flagged" in verbose.stdout


def test_repair_report_to_stdout(tmp_path):
    result = _run("repair", *MODEL_AND_DATA, "--skip-layers", "block", "--epochs", "1", "--no-unlearn",
                  "--verdict", "none", "-o", tmp_path / "r.onnx", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["output"]["path"] == str(tmp_path / "r.onnx")
    assert "wrote" in result.stderr


def test_config_file_values_and_command_line_precedence(tmp_path):
    config = tmp_path / "audit.toml"
    config.write_text('seed = 3\nepochs = 99\n\n[scan]\npreset = "paper"\nsamples = 12\nskip-layers = "block"\n'
                      'mean = [0.5]\nstd = [0.25]\ndata = "%s"\n' % (SAMPLES / "defender.npz"))
    out = tmp_path / "r.json"
    result = _run("scan", SAMPLES / "clean_op13.onnx", "--config", config, "--samples", "8", "--json", out,
                  *QUICK_MARGIN_ARGS)
    assert result.exit_code == 0, result.stderr
    used = json.loads(out.read_text())["config"]
    assert (used["preset"], used["samples"], used["seed"], used["mean"], used["std"]) == ("paper", 8, 3, [0.5],
                                                                                            [0.25])


def test_config_file_errors_are_one_line(tmp_path):
    bad_key, bad_toml, bad_table = tmp_path / "a.toml", tmp_path / "b.toml", tmp_path / "c.toml"
    bad_key.write_text("[scan]\nsampels = 3\n")
    bad_toml.write_text("[scan\n")
    bad_table.write_text("[scna]\nsamples = 3\n")
    for path, message in ((bad_key, "has no option 'sampels'"), (bad_toml, "is not valid TOML"),
                          (bad_table, "unknown table [scna]"), (tmp_path / "none.toml", "cannot read the config")):
        result = _run(*SCAN, "--config", path)
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_the_progress_line_counts_channels_and_names_stages(capsys):
    """The scan tells it of its verdict stage (no count); the line rewrites itself either way."""
    from fmt_audit_cli.console import ProgressLine

    from fmt_audit.fmt.scan import ScanConfig, scan

    seen = []
    line = ProgressLine()

    def both(step, done, total):
        seen.append((step, done, total))
        line(step, done, total)

    scan(SAMPLES / "badnets_op13.onnx", SAMPLES / "defender.npz", ScanConfig(samples=16, skip_layers="block"),
         progress=both, verdict=QUICK_VERDICT)
    assert seen[-1] == ("margin verdict", 0, 0) and seen[-2][1] == seen[-2][2] == 16
    printed = capsys.readouterr().err
    # (click leaves out the escape that clears the rest of the line where stderr is not a terminal)
    assert "16/16 " in printed and "s left (" in printed and printed.endswith("\rmargin verdict ...")
    line.clear()        # an epoch's line then takes its place
    assert capsys.readouterr().err == "\r"


def test_the_progress_line_restarts_its_clock_for_a_new_count(capsys, monkeypatch):
    """The channels, then the verdict's trigger search: its rate and time left are its own, not the average
    since the scan began."""
    from fmt_audit_cli import console

    now = [0.0]
    monkeypatch.setattr(console.time, "perf_counter", lambda: now[0])
    line = console.ProgressLine()
    for done, at in ((1, 10.0), (2, 20.0)):         # channels: 0.1 a second
        now[0] = at
        line("layer", done, 2)
    now[0] = 100.0
    line("trigger search", 0, 300)                  # a new count begins: no rate yet
    assert capsys.readouterr().err.endswith("?/s, ? s left (trigger search)")
    now[0] = 101.0
    line("trigger search", 10, 300)                 # 10 steps a second: 29 s left
    assert capsys.readouterr().err.endswith("10.0/s, 29 s left (trigger search)")
    line("trigger search", 300, 300)                # done, whatever the rate
    assert capsys.readouterr().err.endswith(" 0 s left (trigger search)")
