"""Where the CLI's output goes: the machine-readable report, the human summary, progress.

A report written to ``-`` owns stdout: nothing else goes there, and the human
summary moves to stderr. ``-q`` silences the summary and progress (errors and the
``--fail-on-suspicious`` line remain); progress is drawn only on a terminal.
"""

from __future__ import annotations

import sys
import time

import click

STDOUT = "-"


def verbosity(ctx: click.Context) -> int:
    """-1 quiet, 0 normal, 1+ verbose (set by the ``fmt-audit`` group's ``-q`` / ``-v``)."""
    root = ctx.find_root()
    return (root.obj or {}).get("verbosity", 0)


def say(ctx: click.Context, text: str, json_to_stdout: bool = False) -> None:
    """The human summary: stdout, or stderr when the report goes to stdout; nothing under ``-q``."""
    if verbosity(ctx) >= 0:
        click.echo(text, err=json_to_stdout)


def write_report(destination: str, text: str) -> None:
    """A JSON report to a file (atomically) or, for ``-``, to stdout."""
    if destination == STDOUT:
        click.echo(text, nl=not text.endswith("\n"))
        return
    from fmt_audit.model.outputs import write_atomic

    write_atomic(destination, text.encode())


def progress(ctx: click.Context) -> ProgressLine | None:
    """A progress line when stderr is a terminal and ``-q`` was not given."""
    return ProgressLine() if sys.stderr.isatty() and verbosity(ctx) >= 0 else None


class ProgressLine:
    """One self-rewriting stderr line: items done, rate and time left, from the start of the count (the
    channels, then the verdict's trigger search); for a stage without a count (``total`` 0: the verdict's other
    stages, a trace), its name."""

    def __init__(self):
        self._started = time.perf_counter()
        self._counting = (0, 0)     # the counted stage's total and the last count: a new one restarts the clock
        self._base = 0              # the count when the clock (re)started

    def __call__(self, step: str, done: int, total: int) -> None:
        if total <= 0:
            click.echo(f"\r{step} ...\x1b[K", err=True, nl=False)
            return
        if total != self._counting[0] or done < self._counting[1]:     # the channels, then a trigger search
            self._started, self._base = time.perf_counter(), done
        self._counting = (total, done)
        elapsed = time.perf_counter() - self._started
        rate = (done - self._base) / elapsed if elapsed > 0 and done > self._base else None
        # no rate before the count's first step; nothing left once it is done
        left = "0" if done >= total else (f"{(total - done) / rate:.0f}" if rate else "?")
        width = 24
        filled = int(width * done / max(total, 1))
        click.echo(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                   f"{'?' if rate is None else format(rate, '.1f')}/s, {left} s left ({step})\x1b[K", err=True,
                   nl=False)

    def clear(self) -> None:
        """Rub the line out, so that a whole line (an epoch's) can be printed in its place."""
        click.echo("\r\x1b[K", err=True, nl=False)

    def close(self) -> None:
        click.echo("", err=True)
