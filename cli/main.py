"""``fmt-audit`` entry point: the command group and the error policy.

Exit codes (:mod:`fmt_audit_cli.exit_codes`): 0 success; 1 suspicious
(``--fail-on-suspicious``); 2 usage or input error (one line on stderr); 3 internal
error; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM) — neither leaves a partial
output file. ``--debug`` shows the traceback instead of the one line.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import click

from fmt_audit.errors import FmtAuditError, first_line

from . import exit_codes


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (``finally``, atomic writes) runs as for Ctrl-C."""


def _raise_terminated(_signum, _frame):
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class AuditGroup(click.Group):
    """Turns library errors into one-line messages and documented exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            with _sigterm_raises():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except FmtAuditError as error:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {first_line(error)}", err=True)
            ctx.exit(exit_codes.INPUT_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(exit_codes.INTERRUPTED)
        except Terminated:
            click.echo("terminated", err=True)
            ctx.exit(exit_codes.TERMINATED)
        except Exception as error:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"internal error: {type(error).__name__}: {first_line(error)} "
                       "(rerun with --debug for the traceback)", err=True)
            ctx.exit(exit_codes.INTERNAL_ERROR)


@click.group(cls=AuditGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fmt-audit")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More messages on stderr (-vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="No summary and no progress: errors only (and exit codes).")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: int, quiet: bool) -> None:
    """Audit ONNX image classifiers for backdoors with Feature Map Testing."""
    ctx.obj = {"debug": debug, "verbosity": -1 if quiet else verbose}
    _log_to_stderr(-1 if quiet else verbose)


def _log_to_stderr(verbosity: int) -> None:
    """The library logs its steps under ``fmt_audit``; -v shows INFO, -vv DEBUG, default WARNING."""
    import logging

    class ToStderr(logging.Handler):   # click's stderr of the moment (test runners swap it)
        def emit(self, record: logging.LogRecord) -> None:
            click.echo(self.format(record), err=True)

    logger = logging.getLogger("fmt_audit")
    if not any(type(h).__name__ == "ToStderr" for h in logger.handlers):
        logger.addHandler(ToStderr())
    logger.setLevel({-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG))


def _register() -> None:
    from . import compare_cmd, evaluate_cmd, fleet_cmd, inspect_cmd, repair_cmd, scan_cmd

    main.add_command(inspect_cmd.inspect)
    main.add_command(scan_cmd.scan)
    main.add_command(repair_cmd.repair)
    main.add_command(evaluate_cmd.evaluate)
    main.add_command(compare_cmd.compare)
    main.add_command(fleet_cmd.fleet)


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
