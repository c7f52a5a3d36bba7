"""``fmt-audit evaluate MODEL --data TEST``: ACC, and ASR / RA / DER when triggered data is given."""

from __future__ import annotations

import click

from .console import STDOUT, say, write_report
from .options import (
    CONFIG,
    DEVICE,
    MODEL,
    OptionGroup,
    check_outputs,
    command,
    data_options,
    json_option,
    model_argument,
    opt,
)

EVALUATION = OptionGroup(
    "Evaluation",
    opt("--poisoned", default=None, type=click.Path(path_type=str),
        help="The test images with the trigger applied, labelled with their true classes."),
    opt("--target", type=int, default=None, help="The attack's target class (with --poisoned)."),
    opt("--baseline", default=None, type=click.Path(dir_okay=False, path_type=str),
        help="The model before the defense: its metrics side by side, and the DER."),
)


@command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@MODEL
@data_options("Clean labelled test images.")
@EVALUATION
@OptionGroup("Run", DEVICE, CONFIG)
@json_option("the result")
@click.pass_context
def evaluate(ctx: click.Context, model: str, class_output: str | None, data: str, poisoned: str | None,
             target: int | None, baseline: str | None, mean: str | None, std: str | None, input_range: str | None,
             device: str | None, json_path: str | None) -> None:
    """Measure MODEL's clean accuracy and, given triggered data, its attack success rate."""
    from fmt_audit.data import Preprocessing, parse_channel_values
    from fmt_audit.model.loading import model_files
    from fmt_audit.repair.evaluation import evaluate as run_evaluate

    inputs = [*model_files(model), data, *([poisoned] if poisoned else []),
              *(model_files(baseline) if baseline else [])]
    check_outputs(inputs, {"--json": json_path})
    preprocessing = Preprocessing(parse_channel_values(mean, "--mean"), parse_channel_values(std, "--std"),
                                  input_range or "0-1")
    result = run_evaluate(model_argument(model, class_output), data, poisoned, target,
                          model_argument(baseline, class_output) if baseline else None, preprocessing,
                          device or "auto")
    if json_path:
        write_report(json_path, result.to_json())
    say(ctx, result.format_text(), json_to_stdout=json_path == STDOUT)
