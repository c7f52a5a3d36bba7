"""``--config FILE``: option values from a TOML file; options given on the command line win.

The file holds one table per command (``[scan]``, ``[repair]``, ``[evaluate]``, ``[compare]``, ``[fleet]``)
whose keys are the long option names (``max-memory`` or ``max_memory``, ``json`` for ``--json``) with values
of the option's type (a whole number for a count, true or false for a flag), and may
hold keys at the top level that apply to every command having that option (a key no command has is an
error)::

    device = "cpu"
    seed = 1

    [scan]
    preset = "gradient"
    samples = 512
    mean = [0.4914, 0.4822, 0.4465]

    [repair]
    epochs = 20
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import click

COMMANDS = ("scan", "repair", "evaluate", "compare", "fleet")


def _read(path: str) -> dict:
    from fmt_audit.errors import ConfigError, first_line

    try:
        import tomllib
    except ModuleNotFoundError:     # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read the config file {path}: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid TOML: {first_line(error)}") from None


CONFIG_FILE = "fmt_audit.config_file"      # where the file's path is kept in the click context's meta (an input)


def config_inputs(ctx: click.Context | None) -> list[str]:
    """The command's ``--config`` file, as an input no output may overwrite (none without one)."""
    return [ctx.meta[CONFIG_FILE]] if ctx is not None and CONFIG_FILE in ctx.meta else []


def long_names(param: click.Parameter) -> list[str]:
    """The keys a file may give ``param`` under: its long option names without the dashes (``json`` for
    ``--json``, ``output`` for ``-o/--output``, ``unlearn`` for ``--unlearn/--no-unlearn``)."""
    return [name[2:] for name in param.opts if name.startswith("--")]


def _expected(param: click.Option) -> tuple[tuple[type, ...], str]:
    """The TOML value types ``param`` takes, and how to say so."""
    if param.is_flag or isinstance(param.type, click.types.BoolParamType):
        return (bool,), "true or false"
    if isinstance(param.type, click.types.IntParamType):
        return (int,), "a whole number"
    if isinstance(param.type, click.types.FloatParamType):
        return (int, float), "a number"
    if isinstance(param.type, click.types.StringParamType):     # free text: --eps 0.05, --max-memory 512, --mean [...]
        return (str, int, float, list), "a string, number or array"
    return (str,), "a string"       # a path, a choice


def _value(path: str, key: str, value, param: click.Option):
    """A TOML value as the option takes it, of the option's type (a bool is no count, 64.7 no whole number);
    arrays (a --mean) as comma-separated text."""
    from fmt_audit.errors import ConfigError

    types, what = _expected(param)
    scalar = (str, int, float, bool)
    fits = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if isinstance(value, list):     # an array: of numbers or strings (a --mean)
        fits = list in types and all(isinstance(v, scalar) and not isinstance(v, bool) for v in value)
    if not fits:
        raise ConfigError(f"{path}: {key} must be {what}; got {json.dumps(value, default=str)}")
    return ",".join(str(v) for v in value) if isinstance(value, list) else value


def apply_config(ctx: click.Context, _param: click.Parameter, path: str | None) -> str | None:
    """Turn the file's values for this command into the command's defaults (eager: before other options)."""
    if path is None:
        return None
    from fmt_audit.errors import ConfigError

    table = _read(path)
    ctx.meta[CONFIG_FILE] = path    # an input: no output may overwrite it
    command = ctx.command.name
    options = {name: p for p in ctx.command.params if isinstance(p, click.Option) and p.name != "config"
               for name in long_names(p)}
    group = ctx.parent.command if ctx.parent is not None else None
    commands = getattr(group, "commands", {command: ctx.command})
    # the options of the commands that read a config file
    anywhere = {name for c in commands.values() if c.name in COMMANDS for p in c.params
                if isinstance(p, click.Option) for name in long_names(p)} - {"config"}
    for command_name in COMMANDS:
        if command_name in table and not isinstance(table[command_name], dict):
            raise ConfigError(f"{path}: {command_name} must be a table ([{command_name}]); "
                              f"got {type(table[command_name]).__name__}")
    values = {}
    for key, value in table.items():
        if isinstance(value, dict):
            if key not in COMMANDS:
                raise ConfigError(f"{path}: unknown table [{key}]; expected {', '.join(f'[{c}]' for c in COMMANDS)}")
            continue
        name = key.replace("_", "-")
        if name not in anywhere:
            close = difflib.get_close_matches(name, sorted(anywhere), n=1)
            raise ConfigError(f"{path}: no command has an option {key!r} (top-level keys are long option names of "
                              f"{', '.join(COMMANDS)})" + (f"; did you mean {close[0]!r}?" if close else ""))
        if name in options:     # a key of other commands only (epochs in a scan) applies to them
            values[options[name].name] = _value(path, key, value, options[name])
    for key, value in table.get(command, {}).items():
        name = key.replace("_", "-")
        if name not in options:
            known = ", ".join(sorted(options))
            raise ConfigError(f"{path}: [{command}] has no option {key!r}; expected one of {known}")
        values[options[name].name] = _value(path, key, value, options[name])
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path
