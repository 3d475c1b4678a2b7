"""
The command line every script shares, and the one-line error.

Each script keeps its settings in a dataclass with the defaults at the top of
its file. `parse_config` turns the dataclass fields into argparse options, so
`--key=value` and `--key value` both work, `--help` lists every key with its
type and default, and a value is parsed by the type the dataclass declares.
No config file is ever executed.

Why argparse underneath rather than a hand-written loop: it is the parser
every Python user already knows (nanochat uses it too), and it gives help,
type checking and both spellings of an option for free. This file adds only
what it lacks: errors as one line (argparse prints a usage block), the closest
key named for a typo, booleans written true/false, and no silent prefix
matching (--lr must not quietly mean --lr_decay_iters).

`UserError` is bad input (a missing file, a wrong value): `run` prints it as
one line, `error: ...`, and exits with status 2 instead of a traceback.
Library modules import this file only for UserError; it needs nothing but the
standard library, so that costs nothing.
"""

import argparse
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


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its usage block and exit
        raise UserError(f"{message} (see --help)")


def _converter(kind, key):
    """A function from the text of --key to a value of the declared type; None for 'none' if it is Optional."""
    optional = typing.get_origin(kind) is typing.Union
    if optional:
        kind = next(k for k in typing.get_args(kind) if k is not type(None))

    def convert(text):
        if optional and text.lower() == "none":
            return None
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise UserError(f"--{key} expects true or false, got {text!r}")
        try:
            return kind(text)
        except ValueError:
            raise UserError(f"--{key} expects {kind.__name__}, got {text!r}") from None

    return convert, kind


def _underscored(arg):
    if not arg.startswith("--"):
        return arg
    key, sep, value = arg[2:].partition("=")
    return "--" + key.replace("-", "_") + sep + value


def parse_config(configs, argv, usage=""):
    """
    Apply command-line options to one or more dataclass instances, in place.
    A key belongs to the first config that has it. Returns {key: value} for
    the keys the arguments set, so a caller can tell a default from a choice.
    """
    parser = _Parser(description=usage.strip() or None, allow_abbrev=False,
                     formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32))
    owner = {}
    for config in configs:
        group = parser.add_argument_group(type(config).__name__)
        hints = typing.get_type_hints(type(config))
        for field in dataclasses.fields(config):
            if field.name in owner:
                continue
            owner[field.name] = config
            convert, kind = _converter(hints[field.name], field.name)
            # a bare boolean flag (--compile) switches it on; argparse.SUPPRESS keeps unset keys out of the result
            group.add_argument(f"--{field.name}", dest=field.name, type=convert, default=argparse.SUPPRESS, metavar=kind.__name__,
                               nargs="?" if kind is bool else None, const=True if kind is bool else None,
                               help=f"default: {getattr(config, field.name)!r}")
    # --batch-size is --batch_size: only the key before "=" has its dashes turned into underscores
    argv = [_underscored(arg) for arg in argv]
    assigned, unknown = parser.parse_known_args(argv)
    for arg in unknown:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options are written --key=value (see --help)")
        key = arg[2:].partition("=")[0].replace("-", "_")
        close = difflib.get_close_matches(key, owner, n=1)
        raise UserError(f"unknown option --{key}" + (f": did you mean --{close[0]}?" if close else "; see --help"))
    for key, value in vars(assigned).items():
        setattr(owner[key], key, value)
    return vars(assigned)
