# Sourced (after scripts/srcpath.sh) on a machine without libjpeg's headers, the lent GPU
# machine: makes the native engine's C extension staged by scripts/stage-jpeg.sh importable.
# If .devwheels/jpeg holds a build of the current pipeline/_jpeg.c for this Python, it is copied
# into pipeline/ (as an install would put it) and its libjpeg-turbo goes on LD_LIBRARY_PATH.
# Says in one line what it did; sets TRICKS_JPEG to "staged", "built" (already importable),
# or "missing" (the native engine's CPU decode then uses Pillow, and says so itself).
_jpeg_dir=$PWD/.devwheels/jpeg
_jpeg_py=${PYTHON:-python3}
_jpeg_suffix=$("$_jpeg_py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
_jpeg_so=$_jpeg_dir/_jpeg$_jpeg_suffix
if [ -f "$_jpeg_so" ] && [ "$(awk '/^source /{print $2}' "$_jpeg_dir/BUILD" 2>/dev/null)" \
     != "$(sha256sum pipeline/_jpeg.c | cut -d' ' -f1)" ]; then
  echo "jpeg: .devwheels/jpeg was built from another pipeline/_jpeg.c: not used (rerun scripts/stage-jpeg.sh)"
  # nor a copy an earlier call left in pipeline/
  cmp -s "$_jpeg_so" "pipeline/_jpeg$_jpeg_suffix" && rm -f "pipeline/_jpeg$_jpeg_suffix"
elif [ -f "$_jpeg_so" ]; then
  cp "$_jpeg_so" "pipeline/_jpeg$_jpeg_suffix"
  export LD_LIBRARY_PATH="$_jpeg_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if "$_jpeg_py" -c 'import tricks.pipeline._jpeg' 2>/dev/null; then
  if [ -f "$_jpeg_so" ] && cmp -s "$_jpeg_so" "pipeline/_jpeg$_jpeg_suffix"; then
    TRICKS_JPEG=staged
    echo "jpeg: tricks.pipeline._jpeg from .devwheels/jpeg ($(awk '/^commit /{print $2}' "$_jpeg_dir/BUILD")), libjpeg from $_jpeg_dir/lib"
  else
    TRICKS_JPEG=built
    echo "jpeg: tricks.pipeline._jpeg is built here"
  fi
else
  TRICKS_JPEG=missing
  echo "jpeg: no tricks.pipeline._jpeg for this Python (stage it with scripts/stage-jpeg.sh and carry .devwheels/jpeg): the native engine's CPU decode uses Pillow"
fi
export TRICKS_JPEG
unset _jpeg_dir _jpeg_py _jpeg_suffix _jpeg_so
