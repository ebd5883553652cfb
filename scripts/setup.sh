#!/usr/bin/env bash
# Idempotent set-up: a .venv in the repository with the project installed (editable) at the
# versions pinned in constraints.txt, with the DALI extra and, when its build needs can be had
# from apt, the FFCV extra. Installs python3-venv and FFCV's apt packages when missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
sudo_=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo_="sudo -n"
can_apt() { [ "$(id -u)" -eq 0 ] || [ -n "$sudo_" ]; }
apt_install() {
  echo "setup: apt-get install $*" >&2
  $sudo_ apt-get update -q >/dev/null
  $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
    >/dev/null
}
if [ ! -x .venv/bin/python ]; then
  if ! "$py" -c 'import ensurepip' 2>/dev/null; then
    apt_install python3-venv
  fi
  "$py" -m venv .venv
fi
# the native engine's CPU decoder (tricks.pipeline._jpeg, setup.py) compiles against libjpeg-turbo's
# headers: Debian's libjpeg62-turbo-dev (Ubuntu's libjpeg-turbo8-dev), which libjpeg-dev pulls in.
# Without them the install still succeeds and the engine decodes with Pillow (it says so).
jpeg_h() { echo '#include <stdio.h>
#include <jpeglib.h>' | cc -E -x c - >/dev/null 2>&1; }
if ! jpeg_h; then
  if can_apt; then
    apt_install libjpeg-dev zlib1g-dev build-essential || true
  fi
  jpeg_h || echo "setup: no libjpeg headers: the native engine will decode with Pillow" >&2
fi
# zlib's header gives the extension zlib's CRC-32 (without it: its own, slower, same values);
# jpegtran makes the arithmetic-coded JPEGs of tests/test_convert.py (skipped without it)
zlib_h() { echo '#include <zlib.h>' | cc -E -x c - >/dev/null 2>&1; }
if can_apt && { ! zlib_h || ! command -v jpegtran >/dev/null; }; then
  apt_install zlib1g-dev libjpeg-turbo-progs || true
fi
extras=test,dali
if pkg-config --exists opencv4 libturbojpeg 2>/dev/null && command -v cc >/dev/null; then
  extras=$extras,ffcv
elif can_apt && apt_install pkg-config libopencv-dev libturbojpeg0-dev build-essential; then
  extras=$extras,ffcv
elif [ "${CI:-}" = true ]; then
  echo "setup: FFCV's build needs (pkg-config libopencv-dev libturbojpeg0-dev) could not be installed" >&2
  exit 1
else
  echo "setup: no root for apt: skipping FFCV (its tests will be skipped)" >&2
fi
stamp=.venv/.tricks-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] \
    || [ setup.py -nt "$stamp" ] || [ pipeline/_jpeg.c -nt "$stamp" ] \
    || { jpeg_h && ! ls pipeline/_jpeg*.so >/dev/null 2>&1; } \
    || [ "$(cat "$stamp")" != "$extras" ]; then
  echo "setup: installing the project [$extras] into .venv (first time: a few minutes)" >&2
  # the extension is optional: a build that fails leaves the old module in place, unnoticed
  rm -f pipeline/_jpeg*.so
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
  echo "$extras" > "$stamp"
fi
if ! .venv/bin/python -c 'import tricks.pipeline._jpeg' 2>/dev/null; then
  if jpeg_h; then  # the headers are there, so our C code failed to build: say so, loudly
    echo "setup: error: tricks.pipeline._jpeg failed to build against the libjpeg headers;" \
      "see: .venv/bin/python setup.py build_ext --inplace" >&2
    exit 1
  fi
  echo "setup: tricks.pipeline._jpeg not built: the native engine decodes with Pillow" >&2
fi
