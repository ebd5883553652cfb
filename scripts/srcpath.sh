# Sourced by the GPU scripts: makes the source tree importable as the package `tricks`
# (pipeline/ → tricks.pipeline, …, as pyproject.toml maps it) without installing it, for a
# machine with no package index (the lent GPU machine). Links in a temporary folder put on
# PYTHONPATH; an editable install works as well.
_tricks_src=$(mktemp -d)
mkdir "$_tricks_src/tricks"
for _d in errors pipeline models train benchmarks configs; do
  ln -s "$PWD/$_d" "$_tricks_src/tricks/$_d"
done
export PYTHONPATH="$_tricks_src${PYTHONPATH:+:$PYTHONPATH}"
