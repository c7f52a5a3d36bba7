"""``--config FILE``: option values from a TOML file; options given on the command line win.

The file holds one table per command (``[scan]``, ``[repair]``, ``[evaluate]``, ``[compare]``, ``[fleet]``)
whose keys are the long option names (``max-memory`` or ``max_memory``), and may
hold keys at the top level that apply to every command having that option::

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


def _value(path: str, key: str, value):
    """A TOML value as the option takes it: scalars as they are, arrays (a --mean) as comma-separated text."""
    from fmt_audit.errors import ConfigError

    scalar = (str, int, float, bool)
    if isinstance(value, list) and all(isinstance(v, scalar) for v in value):
        return ",".join(str(v) for v in value)
    if not isinstance(value, scalar):
        raise ConfigError(f"{path}: {key} must be a string, number, boolean or array of those; "
                          f"got {type(value).__name__}")
    return value


def apply_config(ctx: click.Context, _param: click.Parameter, path: str | None) -> str | None:
    """Turn the file's values for this command into the command's defaults (eager: before other options)."""
    if path is None:
        return None
    from fmt_audit.errors import ConfigError

    table = _read(path)
    command = ctx.command.name
    options = {p.name: p for p in ctx.command.params if isinstance(p, click.Option) and p.name != "config"}
    values = {}
    for key, value in table.items():
        if isinstance(value, dict):
            if key not in COMMANDS:
                raise ConfigError(f"{path}: unknown table [{key}]; expected {', '.join(f'[{c}]' for c in COMMANDS)}")
            continue
        name = key.replace("-", "_")
        if name in options:
            values[name] = _value(path, key, value)
    for command_name in COMMANDS:
        if command_name in table and not isinstance(table[command_name], dict):
            raise ConfigError(f"{path}: {command_name} must be a table ([{command_name}]); "
                              f"got {type(table[command_name]).__name__}")
    for key, value in table.get(command, {}).items():
        name = key.replace("-", "_")
        if name not in options:
            known = ", ".join(sorted(n.replace("_", "-") for n in options))
            raise ConfigError(f"{path}: [{command}] has no option {key!r}; expected one of {known}")
        values[name] = _value(path, key, value)
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path
