"""``fmt-audit`` entry point: the command group and the error policy.

Exit codes: 0 success; 2 usage or input error (one line on stderr); 3 internal
error. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

from fmt_audit.errors import FmtAuditError

EXIT_INPUT_ERROR = 2
EXIT_INTERNAL_ERROR = 3


class AuditGroup(click.Group):
    """Turns library errors into one-line messages and documented exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except FmtAuditError as error:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {error}", err=True)
            ctx.exit(EXIT_INPUT_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as error:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            first = str(error).splitlines()[0] if str(error) else ""
            click.echo(f"internal error: {type(error).__name__}: {first} (rerun with --debug for the traceback)",
                       err=True)
            ctx.exit(EXIT_INTERNAL_ERROR)


@click.group(cls=AuditGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fmt-audit")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Audit ONNX image classifiers for backdoors with Feature Map Testing."""
    ctx.obj = {"debug": debug}


def _register() -> None:
    from . import evaluate_cmd, inspect_cmd, repair_cmd, scan_cmd

    main.add_command(inspect_cmd.inspect)
    main.add_command(scan_cmd.scan)
    main.add_command(repair_cmd.repair)
    main.add_command(evaluate_cmd.evaluate)


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
