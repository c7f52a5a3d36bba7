"""``fmt-audit compare MODEL --data CLEAN --test TEST --poisoned TRIGGERED --target T``: every repair
method side by side."""

from __future__ import annotations

import click

from fmt_audit.repair.methods.registry import COMPARED

from .console import STDOUT, say, verbosity, write_report
from .options import (
    MODEL,
    REPAIR,
    RUN,
    SCAN,
    OptionGroup,
    check_outputs,
    command,
    data_options,
    json_option,
    made_folder,
    model_argument,
    opt,
    repair_settings,
    scan_settings,
)

EVALUATION = OptionGroup(
    "Evaluation",
    opt("--test", "test_data", required=True, type=click.Path(path_type=str), help="Clean labelled test images: ACC."),
    opt("--poisoned", default=None, type=click.Path(path_type=str),
        help="The test images with the trigger applied, labelled with their true classes: ASR and RA."),
    opt("--target", type=int, default=None, help="The attack's target class (with --poisoned)."),
)
METHODS = OptionGroup("Repair", opt("--methods", default=",".join(COMPARED), show_default=True,
                                    help="Comma-separated repair methods to run (see `fmt-audit repair --help`); "
                                         "anp (slow at its default --anp-iterations) only when listed."))
OUTPUT = OptionGroup("Output", opt("-o", "--output", "save_dir", default=None,
                                   type=click.Path(file_okay=False, path_type=str),
                                   help="Also write each repaired model into this folder, as METHOD.onnx."))


@command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@MODEL
@data_options("Clean labelled images the defenses may use (.npz or an image folder).")
@EVALUATION
@SCAN
@METHODS
@REPAIR
@RUN
@OUTPUT
@json_option("the comparison (JSON, each method's repair report included)")
@click.pass_context
def compare(ctx: click.Context, model: str, test_data: str, poisoned: str | None, target: int | None,
            methods: str, json_path: str | None, save_dir: str | None, **options) -> None:
    """Repair MODEL with every method and measure each result: ACC, ASR, RA and DER in one table."""
    from pathlib import Path

    from fmt_audit.model.loading import model_files
    from fmt_audit.model.outputs import write_model
    from fmt_audit.repair.comparison import compare as run_compare

    data = options.pop("data")
    class_output = options.pop("class_output")
    config = scan_settings(options)
    settings = repair_settings(options, config.seed)
    names = [name.strip() for name in methods.split(",") if name.strip()]
    inputs = [*model_files(model), data, test_data, *([poisoned] if poisoned else [])]
    targets = {name: Path(save_dir) / f"{name}.onnx" for name in names} if save_dir else {}
    announce = (lambda name: click.echo(f"running {name} ...", err=True)) if verbosity(ctx) >= 0 else None
    outputs = {"--json": json_path}
    for name, path in targets.items():
        outputs |= {f"-o {save_dir}'s {name}.onnx": str(path), f"{name}.onnx's external weights": f"{path}.data"}
    with made_folder(save_dir):     # removed again, where still empty, if the comparison fails
        check_outputs(inputs, outputs)
        result = run_compare(model_argument(model, class_output), data, test_data, poisoned, target, names, settings,
                             config, on_method=announce)
        for outcome in result.outcomes:
            if outcome.method in targets and outcome.model is not None:
                path = targets[outcome.method]
                outcome.repair.record_output(path, write_model(path, outcome.model))
        if json_path:
            write_report(json_path, result.to_json())
    say(ctx, result.format_text(), json_to_stdout=json_path == STDOUT)
