"""``fmt-audit compare MODEL --data CLEAN --test TEST --poisoned TRIGGERED --target T``: every repair
method side by side."""

from __future__ import annotations

import click

from .config_file import config_option
from .console import STDOUT, say, verbosity, write_report
from .repair_cmd import repair_config, repair_options, split_options
from .scan_cmd import scan_config, scan_options


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@scan_options(data_help="Clean labelled images the defenses may use (.npz or an image folder).")
@config_option
@click.option("--test", "test_data", required=True, type=click.Path(path_type=str),
              help="Clean labelled test images: ACC.")
@click.option("--poisoned", default=None, type=click.Path(path_type=str),
              help="The test images with the trigger applied, labelled with their true classes: ASR and RA.")
@click.option("--target", type=int, default=None, help="The attack's target class (with --poisoned).")
@click.option("--methods", default="fmt,ft,fp,clp", show_default=True,
              help="Comma-separated repair methods to run (see `fmt-audit repair --help`, --method).")
@repair_options
@click.option("--json", "json_path", default=None, type=click.Path(path_type=str), metavar="FILE",
              help="Write the comparison (JSON, each method's repair report included) here ('-': to stdout).")
@click.option("--save-dir", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Also write each repaired model here, as METHOD.onnx.")
@click.pass_context
def compare(ctx: click.Context, model: str, data: str, test_data: str, poisoned: str | None, target: int | None,
            methods: str, json_path: str | None, save_dir: str | None, **options) -> None:
    """Repair MODEL with every method and measure each result: ACC, ASR, RA and DER in one table."""
    from pathlib import Path

    from fmt_audit.model.loading import model_files
    from fmt_audit.model.outputs import check_output_path, write_model
    from fmt_audit.repair.comparison import compare as run_compare

    scan_settings, repair_settings = split_options(options)
    config = scan_config(**scan_settings)
    settings = repair_config(config.seed, **repair_settings)
    names = [name.strip() for name in methods.split(",") if name.strip()]
    inputs = [*model_files(model), data, test_data, *([poisoned] if poisoned else [])]
    if json_path and json_path != STDOUT:
        check_output_path(json_path, inputs=inputs)
    targets = {name: Path(save_dir) / f"{name}.onnx" for name in names} if save_dir else {}
    if save_dir:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    for path in targets.values():
        check_output_path(path, inputs=inputs)
        check_output_path(f"{path}.data", inputs=inputs)
    announce = (lambda name: click.echo(f"running {name} ...", err=True)) if verbosity(ctx) >= 0 else None
    result = run_compare(model, data, test_data, poisoned, target, names, settings, config, on_method=announce)
    for outcome in result.outcomes:
        if outcome.method in targets and outcome.model is not None:
            path = targets[outcome.method]
            outcome.repair.record_output(path, write_model(path, outcome.model))
    if json_path:
        write_report(json_path, result.to_json())
    say(ctx, result.format_text(), json_to_stdout=json_path == STDOUT)
