#!/usr/bin/env bash
# Stage the native engine's C extension (tricks.pipeline._jpeg, pipeline/_jpeg.c over
# libjpeg-turbo) for the lent GPU machine, which has Python 3.12 but no compiler headers, no
# libjpeg-dev, no apt and no package index. Run from the project's root, here:
#     scripts/stage-jpeg.sh            (PY312=/path/to/python3.12 to choose the interpreter)
# It builds the extension for Python 3.12 with setup.py (pip wheel: the same flags as an install)
# and writes the ignored folder .devwheels/jpeg (well under 1 MB):
#     _jpeg.cpython-312-x86_64-linux-gnu.so   the extension
#     lib/libjpeg.so.62                       the libjpeg-turbo it links, copied from this machine
#     BUILD                                   what it was built from (_jpeg.c's hash, commit, …)
# On the device: carry [".devwheels/jpeg"]; benchmarks/gpu.sh finds it, copies the extension
# into pipeline/ and puts lib/ on LD_LIBRARY_PATH (and says so; without it the native engine's
# CPU decode falls back to Pillow and says that). For any other command, source
# scripts/jpegpath.sh first (it is what gpu.sh does).
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
py=${PY312:-$(ls -d "$(pyenv root 2>/dev/null || echo /root/.pyenv)"/versions/3.12*/bin/python3.12 \
  2>/dev/null | sed -n 1p)}
[ -x "$py" ] || { echo "error: no Python 3.12 found (set PY312=/path/to/python3.12)" >&2; exit 1; }
[ -f /usr/include/jpeglib.h ] || [ -f /usr/include/x86_64-linux-gnu/jpeglib.h ] || {
  echo "error: libjpeg-turbo's headers are missing: apt-get install libjpeg62-turbo-dev" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# pip builds in an isolated environment with setuptools from the index, as `pip install` would;
# --no-deps: only the extension is wanted, the GPU image has torch and the rest
"$py" -m pip wheel -q --no-deps -w "$tmp/wheel" . >"$tmp/build.log" 2>&1 ||
  { cat "$tmp/build.log" >&2; echo "error: building the wheel with $py failed" >&2; exit 1; }
(cd "$tmp" && "$py" -m zipfile -e wheel/tricks-*.whl unpacked)
ext=$(find "$tmp/unpacked" -name '_jpeg.cpython-312-*.so' | sed -n 1p)
[ -n "$ext" ] || { cat "$tmp/build.log" >&2
  echo "error: the wheel has no _jpeg extension (setup.py builds it optionally: see above)" >&2
  exit 1; }
out=.devwheels/jpeg
rm -rf "$out"; mkdir -p "$out/lib"
cp "$ext" "$out/"
# the libraries it links, but those every Linux has (the C library and its loader)
skip='^(linux-vdso|libc\.|libm\.|libpthread|libdl|librt|ld-linux)'
# (with pipefail: no `| head`, `grep -q` or awk `exit`, whose early exit would fail the writer)
ldd "$ext" | awk '/=> \//{print $1, $3}' | while read -r name path; do
  [[ $name =~ $skip ]] || cp -L "$path" "$out/lib/$name"; done
[ -f "$out/lib/libjpeg.so.62" ] || { ldd "$ext" >&2; echo "error: libjpeg.so.62 not found" >&2; exit 1; }
{ echo "source $(sha256sum pipeline/_jpeg.c)"  # scripts/jpegpath.sh refuses a stale build
  echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- pipeline/_jpeg.c setup.py || echo ' (+ local changes)')"
  echo "python $("$py" -c 'import sys; print(sys.version.split()[0])')"
  echo "compiler $(cc --version | sed -n 1p)"
  echo "libjpeg $(dpkg-query -W -f '${Package} ${Version}' 'libjpeg62-turbo' 2>/dev/null || echo '?')"
} > "$out/BUILD"
# Check: the staged extension loads its own libjpeg, with this machine's hidden where a private
# mount namespace is allowed (as on the GPU machine, which has none)
check='import importlib.util as u, sys
s = u.spec_from_file_location("_jpeg", sys.argv[1]); m = u.module_from_spec(s); s.loader.exec_module(m)
libs = {l.split()[-1] for l in open("/proc/self/maps") if "libjpeg" in l}
assert libs and all(l.startswith(sys.argv[2]) for l in libs), libs
print("check: the staged extension loads", *libs)'
ext=$(ls "$root/$out"/_jpeg.*.so); lib=$root/$out/lib
if unshare -m --propagation private true 2>/dev/null; then
  sys_jpeg=$(ldconfig -p | awk '/libjpeg\.so\.62 / && !f {print $NF; f=1}')
  unshare -m --propagation private bash -c 'mount --bind /dev/null "$0" &&
    ! "$1" -c "import ctypes; ctypes.CDLL(\"libjpeg.so.62\")" 2>/dev/null &&
    echo "check: this machine'"'"'s libjpeg hidden ($0)" &&
    LD_LIBRARY_PATH=$2 "$1" -c "$3" "$4" "$2"' "$sys_jpeg" "$py" "$lib" "$check" "$ext"
else
  LD_LIBRARY_PATH=$lib "$py" -c "$check" "$ext" "$lib"
fi
ls -l "$out" "$out/lib"; cat "$out/BUILD"
