"""
What every script shares: its options, its one-line error, and the machine it runs on.

- `parse_config` turns a script's config dataclasses into options: `--key=value` or `--key value`,
  `--help` lists every key with its default, a typo names the closest key. Argparse underneath (the
  parser every Python user knows); no config file is ever executed.
- `UserError` is bad input; `run` prints it as one line, `error: ...`, with exit status 2.
- `require` imports an optional extra, or says which pip command installs it.
- `write_atomic` writes a file whole or not at all, a failure as one line.
- `pick_device` checks `--device`; `set_threads` gives `--threads` one meaning everywhere.

It needs only the standard library (torch is imported where a function needs it), so that
data/prepare.py and library modules that import UserError load nothing heavy.
"""

import argparse
import contextlib
import dataclasses
import difflib
import functools
import importlib
import os
import re
import sys
import time
import typing
from pathlib import Path

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
    except BrokenPipeError:
        # the reader went away (`... | head`): stop quietly, as the Python docs advise, not with a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its usage block and exit
        raise UserError(f"{message} (see --help)")


def _converter(kind, key):
    """The function from the text of --key to a value of the declared type ('none' for Optional)."""
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


def parse_config(configs, argv, usage="", left_out=None):
    """
    Apply command-line options to one or more dataclass instances, in place.
    A key belongs to the first config that has it. left_out maps keys that are
    not options (a value the data sets, say) to why, which an attempt to set
    one is told. Returns {key: value} for the keys the arguments set, so a
    caller can tell a default from a choice.
    """
    left_out = left_out or {}
    # allow_abbrev=False: no silent prefix matching (--lr must not quietly mean --learning_rate)
    help_format = functools.partial(argparse.RawDescriptionHelpFormatter, max_help_position=32)
    parser = _Parser(description=usage.strip() or None, allow_abbrev=False,
                     formatter_class=help_format)
    owner = {}
    for config in configs:
        group = parser.add_argument_group(type(config).__name__)
        hints = typing.get_type_hints(type(config))
        for field in dataclasses.fields(config):
            if field.name in owner or field.name in left_out:
                continue
            owner[field.name] = config
            convert, kind = _converter(hints[field.name], field.name)
            # a bare boolean flag (--compile) switches it on; SUPPRESS keeps unset keys out of the
            # result
            group.add_argument(f"--{field.name}", dest=field.name, type=convert,
                               default=argparse.SUPPRESS, metavar=kind.__name__,
                               nargs="?" if kind is bool else None,
                               const=True if kind is bool else None,
                               help=f"default: {getattr(config, field.name)!r}")
    # --batch-size is --batch_size: only the key before "=" has its dashes turned into underscores
    assigned, unknown = parser.parse_known_args([_underscored(arg) for arg in argv])
    for arg in unknown:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options are written --key=value "
                            "(see --help)")
        key = arg[2:].partition("=")[0].replace("-", "_")
        if key in left_out:
            raise UserError(f"--{key} {left_out[key]}, not on the command line: drop --{key}")
        close = difflib.get_close_matches(key, owner, n=1)
        hint = f": did you mean --{close[0]}?" if close else "; see --help"
        raise UserError(f"unknown option --{key}{hint}")
    for key, value in vars(assigned).items():
        setattr(owner[key], key, value)
    return vars(assigned)


def require(module, package=None):
    """Import an optional extra, or raise a one-line error naming the pip command for it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{module} is not installed: pip install -r requirements-extra.txt "
                        f"(or pip install {package or module})") from None


# ----------------------------------------------------------------------------
# files: written whole or not at all

def write_atomic(path, data, fix):
    """Write bytes or text to path through a temp file renamed into place; a failure is one line ending in fix."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        # a full disk or a read-only folder: the old file stays whole and no half-written temp file is left
        with contextlib.suppress(OSError):  # a file where the folder should be: no temp file to remove
            tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({e.strerror or e}): {fix}") from None


# ----------------------------------------------------------------------------
# the machine: --device and --threads mean the same in every script

def pick_device(name):
    """The torch device for --device=auto|cpu|cuda|cuda:N, refusing what this machine lacks."""
    import torch  # here, not at the top: data/prepare.py reads options without loading torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if not re.fullmatch(r"cuda(:\d+)?", name):
        raise UserError(f"--device={name} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device={name} but torch sees no CUDA GPU: use --device=cpu")
    if int(name.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise UserError(f"--device={name} but torch sees {torch.cuda.device_count()} GPU(s): "
                        f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return name


def usable_cores():
    """The cores this process may run on (a container or taskset may allow fewer than there are)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_times():
    """(idle, total) jiffies summed over all CPUs, from /proc/stat; None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return values[3] + values[4], sum(values)  # idle + iowait


def idle_cores(cores, seconds=0.2):
    """How many of `cores` were idle over the next `seconds` (rounded); all if /proc cannot tell."""
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return cores
    idle_fraction = (after[0] - before[0]) / (after[1] - before[1])
    # a core counts as free when at least half of it was idle
    return int(idle_fraction * (os.cpu_count() or cores) + 0.5)


def set_threads(requested=0, local_processes=1):
    """
    Set torch's CPU threads: `requested`, or for 0 this process's share of
    the usable cores that are idle now (at least 1). Returns the number.
    More threads than cores is refused: it is never faster, and torch
    crashes on absurd counts.

    Why not every core: torch splits each CPU operation over its threads and
    waits for the slowest. A thread sharing its core with another busy program
    gets it in scheduler slices far longer than a tiny model's operations, so
    nearly every operation waits for it. A program that starts later is not
    seen: on a shared machine pass --threads=1.
    """
    import torch
    cores = usable_cores()
    if not 0 <= requested <= cores:
        raise UserError(f"--threads must be 0 (the idle cores) up to the {cores} cores this process "
                        f"may use, got {requested}")
    threads = requested or max(1, min(cores, idle_cores(cores)) // local_processes)
    torch.set_num_threads(threads)
    return threads
