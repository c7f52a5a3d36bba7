"""``fmt-audit fleet SOURCE --out DIR``: audit a folder or manifest of models, one task per model (Ray)."""

from __future__ import annotations

import click

from .config_file import config_option
from .console import say
from .scan_cmd import parse_eps, parse_size, scan_options

FLEET_DATA_HELP = ("Clean labelled images for every model (.npz or an image folder); a manifest may give each "
                   "model its own.")


@click.command()
@click.argument("source", type=click.Path(path_type=str))
@scan_options(data_help=FLEET_DATA_HELP)
@config_option
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Folder for every model's JSON and HTML report and the summary (fleet.json, fleet.csv); "
                   "created if missing.")
@click.option("--address", default=None, help="Join this Ray cluster (e.g. ray://head:10001 or auto); default: "
                                              "start Ray on this machine.")
@click.option("--workers", type=int, default=None, help="Ray on this machine: CPUs to use (one model each). "
                                                        "[default: all]")
@click.option("--gpus-per-task", type=float, default=0.0, show_default=True,
              help="GPUs Ray reserves for each model's task (fractions share a GPU).")
@click.option("--sequential", is_flag=True, help="Run in this process, one model after another, even with Ray.")
@click.option("--force", is_flag=True, help="Rerun models already audited with the same model and configuration.")
@click.option("--fail-on-suspicious", is_flag=True,
              help="Exit with code 1 when any model is suspicious or inconclusive, or failed.")
@click.pass_context
def fleet(ctx: click.Context, source: str, data: str | None, out: str, address: str | None, workers: int | None,
          gpus_per_task: float, sequential: bool, force: bool, fail_on_suspicious: bool, **options) -> None:
    """Audit every model of SOURCE (a folder of .onnx files, or a .json/.csv manifest) into --out."""
    from fmt_audit.fleet import ray_available, read_source, run_fleet

    models = read_source(source)
    options["eps"] = parse_eps(options["eps"])
    options["max_memory"] = parse_size(options["max_memory"])
    if not sequential and not ray_available():
        say(ctx, f"Ray is not installed (pip install 'fmt-audit[ray]'): auditing {len(models)} models one "
                 "after another in this process")

    def report(row) -> None:
        state = "kept" if row.skipped else ("failed: " + row.error if row.error else row.verdict or "done")
        say(ctx, f"  {row.model}: {state}")

    result = run_fleet(models, data, out, {k: v for k, v in options.items() if v is not None}, address=address,
                       workers=workers, gpus_per_task=gpus_per_task, force=force,
                       use_ray=False if sequential else None, on_row=report, inputs=[source])
    say(ctx, result.format_text())
    if fail_on_suspicious:     # as scan's gate: the verdict decides; without one, any flagged channel
        failing = [r.model for r in result.rows if r.error or r.verdict not in ("clean", None)
                   or (r.verdict is None and r.flagged)]
        if failing:
            from .main import EXIT_SUSPICIOUS

            click.echo(f"suspicious, inconclusive or failed: {', '.join(failing)}", err=True)
            ctx.exit(EXIT_SUSPICIOUS)
