"""The optional C extension (tricks.pipeline._jpeg, the native engine's CPU decode path).

Everything else is declared in pyproject.toml. The extension needs libjpeg-turbo's headers
(Debian: libjpeg62-turbo-dev, which libjpeg-dev pulls in); without them, or without a compiler,
the install still succeeds and the native engine decodes with Pillow instead (it says so once).
zlib's header (zlib1g-dev), where found, gives the decode threads zlib's CRC-32; without it the
extension uses its own CRC-32 of the same polynomial (slower, same values).
"""
import os
import subprocess

from setuptools import Extension, setup


def _has_header(name: str) -> bool:
    """Whether the C compiler finds ``<name>`` (a preprocessor run; False without a compiler)."""
    try:
        return subprocess.run([os.environ.get("CC", "cc"), "-E", "-x", "c", "-"],
                              input=f"#include <{name}>\n", capture_output=True,
                              text=True).returncode == 0
    except OSError:
        return False


ZLIB = _has_header("zlib.h") and os.environ.get("TRICKS_NO_ZLIB") != "1"

setup(ext_modules=[Extension(
    "tricks.pipeline._jpeg", sources=["pipeline/_jpeg.c"],
    libraries=["jpeg"] + (["z"] if ZLIB else []),
    define_macros=[("HAVE_ZLIB", "1")] if ZLIB else [],
    extra_compile_args=["-O3", "-std=c99", "-Wall", "-Wno-unused-parameter"],
    optional=True)])
