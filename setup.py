"""The optional C extension (tricks.pipeline._jpeg, the native engine's CPU decode path).

Everything else is declared in pyproject.toml. The extension needs libjpeg-turbo's headers
(Debian: libjpeg62-turbo-dev, which libjpeg-dev pulls in); without them, or without a compiler,
the install still succeeds and the native engine decodes with Pillow instead (it says so once).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "tricks.pipeline._jpeg", sources=["pipeline/_jpeg.c"], libraries=["jpeg"],
    extra_compile_args=["-O3", "-std=c99", "-Wall", "-Wno-unused-parameter"],
    optional=True)])
