"""``fmt-audit fleet SOURCE -o DIR [--repair]``: audit (and repair) a folder or manifest of models, one task
per model (Ray)."""

from __future__ import annotations

import click
from click.core import ParameterSource

from . import exit_codes
from .config_file import config_inputs
from .console import say
from .options import (
    CACHE,
    REPAIR,
    RUN,
    SCAN,
    VERDICT,
    OptionGroup,
    command,
    data_options,
    opt,
    parse_eps,
    parse_size,
    repair_method,
    usable_folder,
)

FLEET_DATA_HELP = ("Clean labelled images for every model (.npz or an image folder); a manifest may give each "
                   "model its own.")
REPAIRING = OptionGroup(
    "Repair",
    opt("--repair", is_flag=True, help="Also repair the models (as fmt-audit repair, with the channels their scan "
                                       "flagged) into NAME.repaired.onnx, with NAME.repair.json and .html."),
    opt("--repair-when", type=click.Choice(["always", "suspicious"]), default="always", show_default=True,
        help="With --repair: every model, or those whose scan is suspicious or inconclusive (or, without a "
             "verdict, flags channels)."),
)
RAY = OptionGroup(
    "Ray",
    opt("--address", default=None, help="Join this Ray cluster (e.g. ray://head:10001 or auto); default: start Ray "
                                        "on this machine."),
    opt("--workers", type=int, default=None, help="Ray on this machine: CPUs to use (one model each).  [default: all]"),
    opt("--gpus-per-task", type=float, default=0.0, show_default=True,
        help="GPUs Ray reserves for each model's task (fractions share a GPU)."),
    opt("--sequential", is_flag=True, help="Run in this process, one model after another, even with Ray."),
)
OUTPUT = OptionGroup(
    "Output",
    opt("-o", "--out", "out", required=True, type=click.Path(file_okay=False, path_type=str),
        help="Folder for every model's JSON and HTML report and the summary (fleet.json, fleet.csv); created if "
             "missing."),
    opt("--force", is_flag=True, help="Rerun models already audited with the same model and configuration."),
    opt("--fail-on-suspicious", is_flag=True,
        help="Exit with code 1 when any model is suspicious or inconclusive, or failed."),
)


@command()
@click.argument("source", type=click.Path(path_type=str))
@data_options(FLEET_DATA_HELP, required=False)
@SCAN
@VERDICT
@CACHE
@REPAIRING
@repair_method("With --repair: the method (see `fmt-audit repair --help`).")
@REPAIR
@RUN
@RAY
@OUTPUT
@click.pass_context
def fleet(ctx: click.Context, source: str, data: str | None, out: str, address: str | None, workers: int | None,
          gpus_per_task: float, sequential: bool, force: bool, fail_on_suspicious: bool, repair: bool,
          repair_when: str, method: str, **options) -> None:
    """Audit every model of SOURCE (a folder of .onnx files, or a .json/.csv manifest) into -o DIR."""
    from fmt_audit.errors import ConfigError
    from fmt_audit.fleet.audit import ray_available, read_source, run_fleet
    from fmt_audit.report.json_report import attention

    models = read_source(source, out)
    repair_settings = REPAIR.take(options)
    if not repair:
        given = [name for name in ("method", "repair_when", *repair_settings)
                 if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]   # a --config file may share them
        if given:
            raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in given)} without --repair: add "
                              "--repair, or leave the repair options out")
    settings = None
    if repair:      # repair_config's names and values (fmt_audit.repair.pipeline.repair_config)
        settings = {"method": method, "augment": not repair_settings.pop("no_augment"),
                    "unlearn_eps": parse_eps(repair_settings.pop("unlearn_eps"), "--unlearn-eps"), **repair_settings}
    cache_folder = options.pop("cache")
    cache_folder = usable_folder(cache_folder, "--cache") if cache_folder else None
    options["eps"] = parse_eps(options["eps"])
    options["max_memory"] = parse_size(options["max_memory"])
    if not sequential and not ray_available():
        say(ctx, f"Ray is not installed (pip install 'fmt-audit[ray]'): auditing {len(models)} models one "
                 "after another in this process")

    def report(row) -> None:
        state = "kept" if row.skipped else ("failed: " + row.error if row.error else row.verdict or "done")
        say(ctx, f"  {row.model}: {state}")

    result = run_fleet(models, data, out, {k: v for k, v in options.items() if v is not None}, repair=settings,
                       repair_when=repair_when, address=address, workers=workers, gpus_per_task=gpus_per_task,
                       force=force, use_ray=False if sequential else None, on_row=report,
                       inputs=[source, *config_inputs(ctx)],
                       reference_cache=cache_folder)
    say(ctx, result.format_text())
    if fail_on_suspicious:     # scan's gate (fmt_audit.report.json_report.attention), and any model that failed
        failing = [r.model for r in result.rows if r.error or attention(r.verdict, r.suspicion, r.flagged)]
        if failing:
            click.echo(f"suspicious, inconclusive or failed: {', '.join(failing)}", err=True)
            ctx.exit(exit_codes.SUSPICIOUS)
