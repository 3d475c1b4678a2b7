"""
Command-line configuration shared by every script, and one-line errors.

Each script keeps its settings in a dataclass with the defaults at the top of
the file. `parse_config` overrides them from `--key=value` arguments, lists
every key under `--help`, and rejects an unknown key by naming the closest
known one. No config files are executed: a value is parsed by the type the
dataclass declares for it.

`UserError` is for bad input (a missing file, a wrong value): `run` prints it
as one line, `error: ...`, instead of a traceback, and exits with status 2.
"""

import dataclasses
import difflib
import sys
import typing

EXIT_USAGE = 2  # the conventional exit status for bad command-line input


class UserError(Exception):
    """Bad input from the user. Its message names the problem and the fix."""


def run(main):
    """Call main(); turn a UserError into a one-line message and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _parse_value(text, kind, key):
    # Optional[X] parses as X, with "none" meaning None
    if typing.get_origin(kind) is typing.Union:
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if text.lower() == "none":
            return None
        kind = options[0]
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{key} expects true or false, got {text!r}")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise UserError(f"--{key} expects {kind.__name__}, got {text!r}") from None
    return text


def _describe(configs):
    lines = []
    for config in configs:
        hints = typing.get_type_hints(type(config))
        lines.append(f"{type(config).__name__}:")
        for field in dataclasses.fields(config):
            kind = getattr(hints[field.name], "__name__", str(hints[field.name]))
            value = getattr(config, field.name)
            lines.append(f"  --{field.name}={value}  ({kind})")
    return "\n".join(lines)


def parse_config(configs, argv, usage=""):
    """
    Apply `--key=value` arguments to one or more dataclass instances, in place.
    A key belongs to the first config that has it. Returns {key: value} of the
    keys the arguments set, so a caller can tell a default from a choice.
    """
    hints = [typing.get_type_hints(type(c)) for c in configs]
    known = [f.name for c in configs for f in dataclasses.fields(c)]
    assigned = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print((usage.strip() + "\n\n" if usage else "") + _describe(configs))
            sys.exit(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options are written --key=value (see --help)")
        key, sep, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        owner = next((i for i, c in enumerate(configs) if key in hints[i]), None)
        if owner is None:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f": did you mean --{close[0]}?" if close else "; see --help"
            raise UserError(f"unknown option --{key}{hint}")
        kind = hints[owner][key]
        if not sep:
            if kind is not bool:
                raise UserError(f"--{key} needs a value: --{key}=...")
            text = "true"  # a bare boolean flag switches it on
        assigned[key] = _parse_value(text, kind, key)
        setattr(configs[owner], key, assigned[key])
    return assigned
