"""``fmt-audit inspect MODEL``: what the model is and whether the tool can audit it."""

from __future__ import annotations

import json

import click

from .console import STDOUT, say, write_report
from .options import MODEL, OptionGroup, check_outputs, command, json_option, opt

LAYERS = OptionGroup("Output", opt("--layers", "list_layers", is_flag=True, help="List every Conv layer."))


@command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@MODEL
@json_option("the summary")
@LAYERS
@click.pass_context
def inspect(ctx: click.Context, model: str, class_output: str | None, json_path: str | None,
            list_layers: bool) -> None:
    """Validate MODEL and summarise its inputs, Conv layers and convertibility."""
    from fmt_audit.model.inspection import summarize
    from fmt_audit.model.loading import load_model, model_files

    check_outputs(list(model_files(model)), {"--json": json_path})
    summary = summarize(load_model(model, class_output))
    if json_path:
        write_report(json_path, json.dumps(summary.to_dict(), indent=2) + "\n")
    say(ctx, summary.format_text(verbose=list_layers), json_to_stdout=json_path == STDOUT)
