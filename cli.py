"""
What every script shares: its command line, its one-line errors, and how it writes a file.

A bad value is one line, `error: ...`, and exit status 2: a flag's value is refused when the
arguments are parsed, before anything is loaded or written; bad input found later (a missing
file, a corrupt checkpoint) is a cli.Error, which the script's main prints the same way.

    p = cli.Parser(description=__doc__)
    p.add_argument("--max_steps", type=cli.positive_int, default=19073)
    p.add_argument("--max_lr", type=cli.positive_float, default=6e-4)
    ...
    raise cli.Error(f"{path} not found")      # main: `except cli.Error as e: return cli.fail(e)`
    cli.atomic_write("out/config.json", text)  # whole or not at all
"""

import argparse
import json
import math
import os
import sys
import tempfile


class Error(ValueError):
    """Bad input (a flag, a file, a model, a dataset): the message says what and what to do.
    Scripts print it as one line, `error: <message>`, and exit with status 2 (cli.fail)."""


def fail(e, status=2):
    """Print e as the one line `error: ...` on stderr; returns the exit status for main()."""
    print(f"error: {e}", file=sys.stderr)
    return status


def read_jsonl(path):
    """Yield (where, record) for each non-blank line of a JSON-lines file, where = "PATH, line N";
    a line that is not UTF-8 or not JSON, or a file that cannot be read, is an Error naming it."""
    try:
        with open(path, "rb") as f:  # bytes, so that a bad byte is reported with its line
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}, line {lineno}"
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise Error(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
                except json.JSONDecodeError as e:
                    raise Error(f"{where}: not valid JSON ({e.msg})") from None
                except RecursionError:
                    raise Error(f"{where}: JSON nested too deeply") from None
                yield where, record
    except OSError as e:
        raise Error(f"cannot read {path}: {e.strerror or e}") from None


def atomic_write(path, data, fsync=True):
    """Write path whole or not at all: into a private temporary file beside it (concurrent writers
    never share one), flushed to disk, then renamed over path. data is str (text), bytes, or a
    function that writes the temporary file given its path. The file gets the mode any new file
    gets (0666 less the umask; mkstemp's own is 0600). A failed write leaves path as it was."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-" + os.path.basename(path) + "-")
    try:
        if callable(data):
            os.close(fd)
            fd = None
            data(tmp)
        else:
            with os.fdopen(fd, "w" if isinstance(data, str) else "wb") as f:
                fd = None
                f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if fsync:
            sync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def sync(path):
    """fsync a file or a directory (a directory: so that the renames in it are on disk too)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and every flag's default at the end of its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = "(default" in text or "%(default)" in text
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not no_default and not shown:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse, with an error printed as one line (no usage block) and exit status 2, and the
    defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def int_range(lo, hi=None):
    """An argparse type: a whole number in [lo, hi] (1e8 and 100_000_000 are accepted)."""
    def parse(text):
        try:
            f = float(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not f.is_integer():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        v = int(f)
        if v < lo or (hi is not None and v > hi):
            bounds = f"at least {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {v}")
        return v
    return parse


def float_range(lo, hi=None, lo_open=False, hi_open=False):
    """An argparse type: a finite number in [lo, hi] (lo_open / hi_open: excluding that end)."""
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if v < lo or (lo_open and v == lo) or (hi is not None and (v > hi or (hi_open and v == hi))):
            bound = f"{'above' if lo_open else 'at least'} {lo}"
            if hi is not None:
                bound += f" and {'below' if hi_open else 'at most'} {hi}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return v
    return parse


def steps_or_percent(text):
    """An argparse type: a number of steps (an int >= 0), or a share of the run as "N%" (a str,
    turned into steps by steps_of once the run's length is known)."""
    if text.strip().endswith("%"):
        share = float_range(0, 100)(text.strip()[:-1])
        return f"{share:g}%"
    return non_negative_int(text)


def steps_of(value, total):
    """steps_or_percent's value as a number of steps of a run of `total` steps (a share: at least 1
    unless the share is zero)."""
    if isinstance(value, str) and value.endswith("%"):
        share = float(value[:-1]) / 100
        return max(1, round(share * total)) if share > 0 else 0
    return value


def duration(seconds):
    """A time as "1h02m", "3m05s" or "42s"."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


positive_int = int_range(1)
non_negative_int = int_range(0)
positive_float = float_range(0, lo_open=True)
non_negative_float = float_range(0)


def device(text):
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:1, mps)."""
    import torch

    try:
        kind = torch.device(text).type
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cuda, cuda:1, mps, cpu)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    if kind not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu, cuda and mps are supported")
    return text
