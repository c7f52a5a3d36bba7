"""``fmt-audit inspect MODEL``: what the model is and whether the tool can audit it."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="List every Conv layer.")
def inspect(model: str, as_json: bool, verbose: bool) -> None:
    """Validate MODEL and summarise its inputs, Conv layers and convertibility."""
    from fmt_audit.model.inspection import summarize
    from fmt_audit.model.loading import load_model

    summary = summarize(load_model(model))
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        click.echo(summary.format_text(verbose=verbose))
