"""The errors that mean "the input is wrong": a bad file, option or environment. The CLI prints
each as one line, ``error: <message>``, and exits 1 (``exit_on_user_error``); the Python API
raises them as they are. This package imports nothing of ours, so every layer may use it
(tests/test_layers.py holds the layering).

    UserError           the base: bad input, option or environment
    ├── DataError       a dataset path, file or record that cannot be used
    ├── OptionError     an option outside its range (also a ValueError, for library users)
    └── ConfigError     a config key or value (``tricks train``'s YAML and overrides)
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input, option or environment: the CLI prints ``error: <message>`` and exits 1."""


class DataError(UserError):
    """A dataset path, file or record that cannot be used."""


class OptionError(UserError, ValueError):
    """An op or loader option outside its valid range (a ValueError for library users too)."""


class ConfigError(UserError):
    """A config key or value that cannot be used (named in the message)."""


def one_line(e: BaseException) -> str:
    """The error as one line: errors re-raised from a DataLoader worker carry the worker's
    traceback; keep its last line, without the exception's type name."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else type(e).__name__
    if ": " in line and line.split(": ", 1)[0].endswith("Error"):
        line = line.split(": ", 1)[1]
    return line


def exit_on_user_error(main: Callable[[], int]) -> int:
    """Run a command's ``main``: a ``UserError`` is printed as ``error: <one line>`` on stderr
    (status 1), Ctrl-C as ``interrupted`` (status 130); anything else propagates."""
    try:
        return main()
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
