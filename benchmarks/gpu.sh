#!/usr/bin/env bash
# The prepared GPU run, in parts sized to the device lease (15 min of device time a session,
# at most 10 min a command): each part is meant to finish in ≤ 6 min on one H100/H200 (the
# estimates below; the per-stage timings in $OUT/part-<p>-stages.tsv correct them after the
# first real run). One device call per part, most valuable first:
#
#   a  Table 3 for ResNet-50 and ResNet-50-D: synthetic input (baseline, efficient, efficient
#      + trick stack), and fed from generated ImageNet-sized JPEGs by the native engine and
#      DALI (efficient, efficient + trick stack)                               (≈ 5 min)
#   b  the rest of Table 3 (Inception-V3, MobileNet, ResNet-18), ResNet-50 with torch.compile
#      and with CUDA graphs                                                    (≈ 5 min)
#   c  the CUDA tests (pytest -m gpu), the loader benchmark (every engine, the native
#      engine's CPU decode with 16 workers too) and the augment benchmark      (≈ 5 min)
#
#     OUT=/tmp/out bash benchmarks/gpu.sh a        (QUICK=1: a small rehearsal on a CPU)
#
# Results go to $OUT as each stage ends (a kill keeps what was done): part-<p>.tar.gz (every
# JSON, table, chart and log so far, replaced atomically after each stage), part-<p>.log,
# part-<p>-stages.tsv (seconds per stage) and the Markdown tables: at most 8 files, as the
# device tool returns. Runs from the source tree (scripts/srcpath.sh). DALI runs only where
# `import nvidia.dali` works (see ../shared/device/README.md for carrying it). The native
# engine's C extension (its CPU decode, part c's 16-worker line) is used when built here or
# carried in .devwheels/jpeg (scripts/stage-jpeg.sh, then scripts/jpegpath.sh finds it);
# without it that line measures the Pillow fallback, and the log says so.
set -uo pipefail
part=${1:-}
case "$part" in a|b|c) ;; *) echo "usage: benchmarks/gpu.sh a|b|c" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
. scripts/srcpath.sh
export PYTHONUNBUFFERED=1
export TRICKS_CACHE=${TRICKS_CACHE:-/tmp/tricks-cache}
OUT=${OUT:-gpu-out}
py=${PYTHON:-python3}
if [ "${QUICK:-0}" = 1 ]; then
  # the same stages with small models and inputs (the ResNet-50s run at < 1 image/s here)
  images=256 workers=2 many_workers=2 size=(--size 32) timing=(--warmup 1 --windows 2 --steps 2)
  batches=(--baseline-batch 4 --efficient-batch 8) main=resnet18,resnet18d rest=resnet18
  compile_model=resnet18
  loader=(--images 128 --batch 32 --runs 1) augment=(--batch 4 --size 64 --runs 2)
  tests=(tests/test_no_sync.py)
else
  images=8192 workers=14 many_workers=16 size=() timing=(--warmup 8 --windows 5 --steps 6)
  batches=() main=resnet50,resnet50d rest=inception_v3,mobilenet_v1,resnet18
  compile_model=resnet50
  loader=(--images 4096 --batch 256 --runs 3) augment=() tests=(tests)
fi
mkdir -p "$OUT"
R=$(mktemp -d)/part-$part
mkdir -p "$R"
log="$OUT/part-$part.log"
stages="$OUT/part-$part-stages.tsv"
: > "$log"
printf 'stage\tseconds\tstatus\n' > "$stages"
start=$SECONDS
say() { echo "[$((SECONDS - start)) s] $*" | tee -a "$log"; }
save() {  # everything so far, replaced atomically: a kill leaves the last complete archive
  tar -czf "$OUT/.part-$part.tar.gz" -C "$(dirname "$R")" "part-$part" &&
    mv "$OUT/.part-$part.tar.gz" "$OUT/part-$part.tar.gz"
}
stage() {  # stage NAME command…: run, log, time; a failure is logged and the part goes on
  local name=$1 t0=$SECONDS status=ok
  shift
  say "start $name"
  "$@" > "$R/$name.log" 2>&1 || status="failed ($?)"
  tail -n 25 "$R/$name.log" >> "$log"
  printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$status" >> "$stages"
  say "end $name: $status, $((SECONDS - t0)) s"
  save
}
table() { [ -f "$R/$1/train.md" ] && cp "$R/$1/train.md" "$OUT/$2" || true; }

say "part $part on $(hostname)"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv; $py -c 'import sys, torch, torchvision; print("python", sys.version.split()[0],
"torch", torch.__version__, "torchvision", torchvision.__version__,
"cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))'; } 2>&1 | tee -a "$log"

PYTHON=$py . scripts/jpegpath.sh > "$R/jpeg.log" 2>&1
say "$(cat "$R/jpeg.log")"
engines=native
if $py -c 'import nvidia.dali' >/dev/null 2>&1; then
  engines=native,dali
else
  say "no DALI here (import nvidia.dali failed): native engine only"
fi

jpegs() {  # generated ImageNet-sized JPEGs, converted; kept in $TRICKS_CACHE between parts
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
print(tree, out)
PY
}
records="$TRICKS_CACHE/bench/records-jpegs-$images"
bench() { $py -m tricks.benchmarks.throughput "${size[@]}" "${batches[@]}" "${timing[@]}" "$@"; }

case "$part" in
a)
  # 6 configurations of ~15 s (batch 1024 FP16, 38 steps + cuDNN autotuning); JPEGs ~60 s;
  # 4 (native) + 4 (DALI) data-fed configurations of ~20 s
  stage synthetic bench --models "$main" --modes baseline,efficient,efficient-stack \
    --out "$R/synthetic"
  table synthetic table3-a-synthetic.md
  stage jpegs jpegs
  stage data bench --models "$main" --modes efficient,efficient-stack \
    --data "$records" --engines "$engines" --workers "$workers" --out "$R/data"
  table data table3-a-data.md
  ;;
b)
  # 6 configurations of ~12 s; two torch.compile runs of ~60-100 s each (compilation)
  stage rest bench --models "$rest" --modes baseline,efficient --out "$R/rest"
  table rest table3-b-rest.md
  stage compile bench --models "$compile_model" --modes efficient,efficient-compile,efficient-graphs \
    --out "$R/compile"
  table compile table3-b-compile.md
  ;;
c)
  # tests ~90 s; loader (photographs: making 4,096 ~60 s, then 4 cells × 5 engines × 4 windows
  # and their set-up) ~180 s; the native CPU decode with 16 workers ~40 s; augment ~30 s. The
  # loader JSONs are written after each cell, so a kill keeps the finished cells.
  stage cuda-tests $py -m pytest -q -rs -m gpu -p no:cacheprovider "${tests[@]}"
  stage loader $py -m tricks.benchmarks.loader "${loader[@]}" --workers "$workers" \
    --out "$R/loader"
  stage loader-cpu-decode $py -m tricks.benchmarks.loader "${loader[@]}" --engines native \
    --decode workers --workers "$many_workers" --out "$R/loader-cpu-decode"
  stage augment $py -m tricks.benchmarks.augment "${augment[@]}" --out "$R/augment"
  ;;
esac
say "part $part done in $((SECONDS - start)) s"
