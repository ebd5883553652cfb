#!/usr/bin/env bash
# The prepared GPU run (Table 3 on one H100/H200, under 7 minutes): the CUDA tests; the
# training throughput of the five Table 3 models, baseline against efficient, with synthetic
# input; ResNet-50-D fed from generated ImageNet-sized JPEGs by the native engine (and DALI
# when its package is there); then, each only while time allows, ResNet-50 with torch.compile
# and CUDA graphs, the loader benchmark and the augment benchmark. $OUT (default ./gpu-out)
# gets gpu-results.tar.gz (every JSON, table, chart and log) and the Table 3 tables: few files,
# as the device tool returns at most 8. Runs from the source tree:
#     OUT=/tmp/out bash benchmarks/gpu.sh
# QUICK=1 shrinks everything for a rehearsal on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/srcpath.sh
export PYTHONUNBUFFERED=1
export TRICKS_CACHE=${TRICKS_CACHE:-/tmp/tricks-cache}
OUT=${OUT:-gpu-out}
py=${PYTHON:-python3}
if [ "${QUICK:-0}" = 1 ]; then
  models=resnet18 compile_models=resnet18 images=256 workers=2 size=(--size 64) timing=(--warmup 1 --windows 2 --steps 2)
  batches=(--baseline-batch 8 --efficient-batch 16) loader_batch=32 augment=(--batch 4 --size 64)
else
  models=resnet50,resnet50d,inception_v3,mobilenet_v1,resnet18 images=16384 workers=14 size=()
  timing=(--warmup 10 --windows 5 --steps 8) batches=() loader_batch=256 augment=()
fi
mkdir -p "$OUT"
R=$(mktemp -d)/gpu-results
mkdir -p "$R"
trap 'tar -czf "$OUT/gpu-results.tar.gz" -C "$(dirname "$R")" gpu-results' EXIT
start=$SECONDS
stamp() { echo "[$((SECONDS - start)) s] $*"; }

stamp "device"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$R/nvidia-smi.csv"
fi
$py -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'

stamp "CUDA tests (pytest -m gpu)"
if ! $py -m pytest -q -rs -m gpu -p no:cacheprovider tests > "$R/cuda-tests.log" 2>&1; then
  stamp "CUDA tests failed (see cuda-tests.log); the benchmarks go on"
fi
tail -n 3 "$R/cuda-tests.log"

stamp "Table 3, synthetic input"
$py -m tricks.benchmarks.throughput --models "$models" "${size[@]}" "${batches[@]}" "${timing[@]}" \
    --out "$R/train-synthetic" 2>&1 | tee "$R/train-synthetic.log"

stamp "generated JPEGs"
$py - "$images" "$workers" <<'PY'
import sys
from tricks.benchmarks.loader import make_jpegs
from tricks.pipeline.convert import convert
from tricks.train.data import cache_dir
n, workers = int(sys.argv[1]), int(sys.argv[2])
tree = make_jpegs(cache_dir() / "bench" / f"jpegs-{n}", n, workers=workers)
out = cache_dir() / "bench" / f"records-jpegs-{n}"
if not (out / "classes.json").is_file():
    convert(tree, out, workers=workers, progress=False)
PY
records="$TRICKS_CACHE/bench/records-jpegs-$images"
engines=native
if $py -c 'from pipeline.engines.base import engine_class; engine_class("dali")' 2>/dev/null; then
  engines=native,dali
fi

stamp "ResNet-50-D from JPEGs ($engines)"
$py -m tricks.benchmarks.throughput --models resnet50d --data "$records" --engines "$engines" \
    --workers "$workers" "${size[@]}" "${batches[@]}" "${timing[@]}" --out "$R/train-data" \
    2>&1 | tee "$R/train-data.log"

cp "$R/train-synthetic/train.md" "$OUT/table3-synthetic.md"
cp "$R/train-data/train.md" "$OUT/table3-data.md"

# The rest is optional, each part only while the run is well inside its 7 minutes
within() {  # within SECONDS PART: true if less than SECONDS have been used so far
  if [ $((SECONDS - start)) -lt "$1" ]; then return 0; fi
  stamp "skipped $2: $((SECONDS - start)) s used"; return 1
}
if within "${COMPILE_BEFORE_S:-200}" "torch.compile and CUDA graphs"; then
  stamp "ResNet-50 with torch.compile and CUDA graphs"
  if $py -m tricks.benchmarks.throughput --models "${compile_models:-resnet50}" --compile --cuda-graphs \
      "${size[@]}" "${batches[@]}" "${timing[@]}" --out "$R/train-compile" \
      > "$R/train-compile.log" 2>&1; then
    cp "$R/train-compile/train.md" "$OUT/table3-compile.md"
  else
    stamp "compile run failed (see train-compile.log)"
  fi
fi
if within "${LOADER_BEFORE_S:-330}" "the loader benchmark"; then
  stamp "loader"
  $py -m tricks.benchmarks.loader --images "$images" --batch "$loader_batch" --workers "$workers" \
      --runs 3 --out "$R/loader" 2>&1 | tee "$R/loader.log"
fi
if within "${AUGMENT_BEFORE_S:-390}" "the augment benchmark"; then
  stamp "augment"
  $py -m tricks.benchmarks.augment "${augment[@]}" --out "$R/augment" 2>&1 | tee "$R/augment.log"
fi
stamp "done"
