"""``fmt-audit repair MODEL --data CLEAN -o REPAIRED.onnx``: scan, remove, fine-tune, write back, verify, and check
the result with the verdict (the self-check)."""

from __future__ import annotations

from functools import partial

import click

from . import exit_codes
from .console import progress, say, verbosity, write_report
from .options import (
    CACHE,
    DATA_HELP,
    FAIL_IF_PERSISTS,
    MODEL,
    REPAIR,
    REPAIR_METHODS,
    RUN,
    SCAN,
    STDOUT,
    VERDICT,
    OptionGroup,
    check_outputs,
    command,
    data_options,
    html_option,
    json_option,
    model_argument,
    opt,
    reference_cache,
    refuse_html_to_stdout,
    repair_method,
    repair_settings,
    scan_settings,
    verdict_settings,
)

# the methods that run without data, for --data's help
DATA_FREE = ", ".join(name for name, method in REPAIR_METHODS.items() if not method.needs_data)
FROM_REPORT = OptionGroup("Repair", opt(
    "--from-report", default=None, type=click.Path(dir_okay=False, path_type=str),
    help="Remove the channels flagged in this scan report (from `fmt-audit scan --json`) instead of scanning."))
OUTPUT = OptionGroup("Output", opt("-o", "--output", required=True, type=click.Path(path_type=str),
                                   help="Write the repaired ONNX model here (never the input file)."))


@command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@MODEL
@data_options(f"{DATA_HELP} Required, except with --method {DATA_FREE} (data-free; with data, it only measures "
              "accuracy).", required=False)
@SCAN
@repair_method()
@FROM_REPORT
@REPAIR
@VERDICT
@CACHE
@RUN
@OUTPUT
@json_option("the repair report")
@html_option("removed channels, accuracy, training curve, scan")
@FAIL_IF_PERSISTS
@click.pass_context
def repair(ctx: click.Context, model: str, method: str, output: str, from_report: str | None,
           json_path: str | None, html_path: str | None, fail_if_persists: bool, **options) -> None:
    """Remove MODEL's backdoor channels (by --method), fine-tune it on clean data, write the repaired model, and
    check it: the verdict (--verdict, on the same data) on the model as given and on the repaired one says
    whether the backdoor was removed or may persist."""
    from fmt_audit.model.loading import model_files
    from fmt_audit.model.outputs import write_model
    from fmt_audit.repair.pipeline import repair as run_repair
    from fmt_audit.report.json_report import ScanReport

    data = options.pop("data")
    class_output = options.pop("class_output")
    config = scan_settings(options)
    settings = repair_settings(options, config.seed, method)
    check = verdict_settings(options, config.seed)      # checked with or without data
    check = check if data else None
    if config.selection == "trace" and not from_report:     # a report's channels are removed as they are
        _refuse_untraceable(method, check, data)
    references = reference_cache(options)
    inputs = [*model_files(model), *([data] if data else []), *([from_report] if from_report else [])]
    refuse_html_to_stdout(html_path)
    check_outputs(inputs, {"-o": output, f"-o {output}'s external weights (a model past 2 GiB)": f"{output}.data",
                           "--json": json_path, "--html": html_path})
    flagged = ScanReport.read(from_report) if from_report else None
    if flagged is not None:
        config = inherit_preprocessing(config, flagged)
    bar = progress(ctx)
    result = run_repair(model_argument(model, class_output), data, settings, config, flagged=flagged,
                        progress=bar,
                        on_epoch=partial(_echo_epoch, bar) if bar or verbosity(ctx) > 0 else None, check=check,
                        references=references)
    if bar:
        bar.close()
    result.report.record_output(output, write_model(output, result.model))
    if json_path:
        write_report(json_path, result.report.to_json())
    if html_path:
        from fmt_audit.report.html_report import repair_html

        # the scan run here, or the one the channels came from (--from-report)
        write_report(html_path, repair_html(result.report, result.scan or flagged))
    say(ctx, f"{result.report.format_text()}\nwrote {output}", json_to_stdout=json_path == STDOUT)
    status = (result.report.self_check or {}).get("status")
    if fail_if_persists and status not in ("removed", "not found"):
        click.echo(f"the self-check says: {status or 'not run (--verdict none or no --data)'}", err=True)
        ctx.exit(exit_codes.PERSISTS)


def _refuse_untraceable(method: str, check, data: str | None) -> None:
    """``--selection trace`` chooses the channels ``fmt`` removes by the ``combined`` verdict: as ``scan`` does,
    refuse it without that verdict, and with a method that removes no given channels."""
    from fmt_audit.errors import ConfigError
    from fmt_audit.fmt.trace import require_combined
    from fmt_audit.repair.methods.registry import TAKE_CHANNELS

    if method not in TAKE_CHANNELS:
        raise ConfigError(f"--selection trace chooses the channels to remove: it goes with --method "
                          f"{', '.join(TAKE_CHANNELS)}, not {method}")
    if data:
        require_combined(check)


def _echo_epoch(bar, record) -> None:
    if bar:     # the progress line stands where the epoch goes (a stage's name, the last channel)
        bar.clear()
    held = "" if record.holdout_accuracy is None else f", holdout accuracy {record.holdout_accuracy:.4f}"
    click.echo(f"epoch {record.epoch}: loss {record.loss:.4f}, train accuracy {record.accuracy:.4f}{held}", err=True)


def inherit_preprocessing(config, report):
    """The scan report's --mean/--std/--input-range when none are given; refuse different ones (the channels
    were chosen on the model fed that way)."""
    from dataclasses import replace

    from fmt_audit.errors import ConfigError

    saved = (report.config.get("mean"), report.config.get("std"))
    saved = tuple(tuple(v) if v else None for v in saved)
    saved_range = report.config.get("input_range", "0-1")     # reports before 0.3 had no input range
    given_range = config.input_range if config.input_range != "0-1" else None
    if config.mean is None and given_range is None:
        return replace(config, mean=saved[0], std=saved[1], input_range=saved_range)
    if (config.mean, config.std, config.input_range) != (*saved, saved_range):
        raise ConfigError(f"--mean/--std/--input-range differ from the scan report's ({saved[0]}, {saved[1]}, "
                          f"{saved_range}); give the same values or leave them out")
    return config
