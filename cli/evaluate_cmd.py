"""``fmt-audit evaluate MODEL --data TEST``: ACC, and ASR / RA / DER when triggered data is given."""

from __future__ import annotations

import click

from .config_file import config_option
from .console import STDOUT, say, write_report


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@config_option
@click.option("--data", required=True, type=click.Path(path_type=str), help="Clean labelled test images.")
@click.option("--poisoned", default=None, type=click.Path(path_type=str),
              help="The test images with the trigger applied, labelled with their true classes.")
@click.option("--target", type=int, default=None, help="The attack's target class (with --poisoned).")
@click.option("--baseline", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="The model before the defense: its metrics side by side, and the DER.")
@click.option("--mean", default=None, help="Per-channel mean the model expects, e.g. 0.4914,0.4822,0.4465.")
@click.option("--std", default=None, help="Per-channel std the model expects.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (and nothing else) on stdout.")
@click.pass_context
def evaluate(ctx: click.Context, model: str, data: str, poisoned: str | None, target: int | None, baseline: str | None,
             mean: str | None, std: str | None, device: str, as_json: bool) -> None:
    """Measure MODEL's clean accuracy and, given triggered data, its attack success rate."""
    from fmt_audit.data import Preprocessing, parse_channel_values
    from fmt_audit.repair.evaluation import evaluate as run_evaluate

    preprocessing = Preprocessing(parse_channel_values(mean, "--mean"), parse_channel_values(std, "--std"))
    result = run_evaluate(model, data, poisoned, target, baseline, preprocessing, device)
    if as_json:
        write_report(STDOUT, result.to_json())
    else:
        say(ctx, result.format_text())
