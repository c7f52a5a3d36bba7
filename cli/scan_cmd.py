"""``fmt-audit scan MODEL --data DATA``: feature map testing of every Conv channel, and the model's verdict."""

from __future__ import annotations

import click

from . import exit_codes
from .console import progress, say, write_report
from .options import (
    CACHE,
    FAIL_ON_SUSPICIOUS,
    MODEL,
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
    scan_settings,
    verdict_settings,
)

RAY = OptionGroup(
    "Ray",
    opt("--ray", "use_ray", is_flag=True, help="Test the layers on Ray workers, in chunks of layers (same report)."),
    opt("--address", default=None, help="With --ray: join this Ray cluster (default: Ray on this machine)."),
    opt("--workers", type=int, default=None, help="With --ray on this machine: CPUs to use.  [default: all]"),
)


@command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@MODEL
@data_options()
@SCAN
@VERDICT
@CACHE
@RUN
@RAY
@json_option()
@html_option("the verdict's evidence, tables and score plots")
@FAIL_ON_SUSPICIOUS
@click.pass_context
def scan(ctx: click.Context, model: str, json_path: str | None, html_path: str | None, fail_on_suspicious: bool,
         use_ray: bool, address: str | None, workers: int | None, **options) -> None:
    """Test every Conv channel of MODEL, flag the suspicious ones, and say whether MODEL looks backdoored."""
    from fmt_audit.fmt.scan import scan as run_scan
    from fmt_audit.model.loading import model_files

    data = options.pop("data")
    class_output = options.pop("class_output")
    config = scan_settings(options)
    verdict = verdict_settings(options, config.seed)
    references = reference_cache(options)
    refuse_html_to_stdout(html_path)
    check_outputs([*model_files(model), data], {"--json": json_path, "--html": html_path})
    runner = None
    if use_ray:
        from fmt_audit.fleet.ray_engine import ray_runner

        runner = ray_runner(address, workers)
    elif address or workers is not None:
        from fmt_audit.errors import ConfigError

        raise ConfigError("--address and --workers go with --ray")
    bar = progress(ctx)
    report = run_scan(model_argument(model, class_output), data, config, progress=bar, runner=runner, verdict=verdict,
                      references=references)
    if bar:
        bar.close()
    if json_path:
        write_report(json_path, report.to_json())
    if html_path:
        from fmt_audit.report.html_report import scan_html

        write_report(html_path, scan_html(report))
    say(ctx, report.format_text(), json_to_stdout=json_path == STDOUT)
    reason = report.attention() if fail_on_suspicious else None
    if reason:
        click.echo(reason, err=True)
        ctx.exit(exit_codes.SUSPICIOUS)
