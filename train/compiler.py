"""The compiler ``torch.compile`` calls at run time, found before training starts.

Inductor compiles generated code while the first steps run: on CUDA, Triton builds the launcher
of each kernel with a C compiler (``CC``, else ``gcc``, else ``clang``: Triton's
``runtime/build.py``, ``_find_compiler``); on the CPU, Inductor builds C++ with ``CXX``, else
``g++`` (``torch._inductor.config.cpp.cxx``; ``clang++`` is looked for here too). A machine
without one fails deep inside the first step with a long traceback; ``require_compiler`` says it
in one line instead, when the model is built.
"""
from __future__ import annotations

import os
import shutil

from tricks.errors import ConfigError

# (environment variable, programs looked up on PATH in order) per device type
_SEARCH = {"cuda": ("CC", ("gcc", "clang")), "cpu": ("CXX", ("g++", "clang++"))}


def find_compiler(device_type: str) -> str | None:
    """The path (or ``$CC``/``$CXX`` as given) of the compiler ``torch.compile`` would call for
    ``device_type`` ("cuda" or "cpu"), or None when there is none."""
    env, programs = _SEARCH["cuda" if device_type == "cuda" else "cpu"]
    if os.environ.get(env):
        return os.environ[env]
    for name in programs:
        path = shutil.which(name)
        if path:
            return path
    return None


def missing_compiler(device_type: str) -> str | None:
    """None when ``torch.compile`` can compile for ``device_type`` here, else why not (one
    line, naming what was looked for)."""
    if find_compiler(device_type) is not None:
        return None
    env, programs = _SEARCH["cuda" if device_type == "cuda" else "cpu"]
    what = "Triton's kernel launchers need a C compiler" if device_type == "cuda" else \
        "Inductor's CPU kernels need a C++ compiler"
    return (f"torch.compile on {device_type}: {what} at run time and none was found "
            f"(${env} unset, no {' or '.join(programs)} on PATH)")


def require_compiler(device_type: str, option: str = "train.compile") -> None:
    """Raise ConfigError (one line, naming ``option``) when ``torch.compile`` has no compiler to
    call for ``device_type`` here."""
    why = missing_compiler(device_type)
    if why:
        raise ConfigError(f"{option}: {why}; install gcc (apt-get install gcc) or set "
                        f"{_SEARCH['cuda' if device_type == 'cuda' else 'cpu'][0]}, or turn "
                        f"{option} off")
