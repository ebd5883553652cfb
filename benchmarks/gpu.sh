#!/usr/bin/env bash
# The prepared GPU run, in parts sized to the device lease (15 min of device time a session,
# at most 10 min a command): each part is estimated at ≈ 5 min on one H100/H200 (the figures
# below; the per-stage timings in $OUT/part-<p>-stages.tsv correct them after the first real
# run). One device call per part, most valuable first:
#
#   a  Table 3 for ResNet-50 and ResNet-50-D with synthetic input (baseline FP32 as torch runs
#      it, strict FP32 without TF32, efficient, efficient + trick stack), then ResNet-50 fed
#      from 8,192 generated ImageNet-sized JPEGs by the native engine and DALI (efficient,
#      efficient + trick stack)                                                 (≈ 5 min)
#   b  the rest of Table 3 (Inception-V3, MobileNet, ResNet-18: baseline, strict FP32,
#      efficient), ResNet-50 with torch.compile and with CUDA graphs            (≈ 5 min)
#   c  the CUDA tests (pytest -m gpu), the loader benchmark (every engine, and the native
#      engine's CPU decode with 16 workers) and the augment benchmark           (≈ 5 min)
#
#     OUT=/tmp/out bash benchmarks/gpu.sh a        (QUICK=1: a small rehearsal on a CPU)
#
# What cannot be lost: every stage runs under `timeout` (its own limit, and never past the
# part's budget, PART_BUDGET seconds, default 540, so the script ends, archive written, before
# a 600-s device call is cut); the benchmarks rewrite their JSON after every configuration (bench
# train) or cell (bench loader); $OUT/part-<p>.tar.gz (every JSON, table, chart and log so
# far) is replaced atomically every 30 s while a stage runs and when it ends. Also in $OUT:
# part-<p>.log, part-<p>-stages.tsv (seconds and status per stage) and the Markdown tables: at
# most 8 files, as the device tool returns. The log starts with a preflight: GPU, driver,
# Python, torch, torchvision, DALI and FFCV versions, and the C compiler torch.compile needs
# (none: the compile stages are skipped, saying why). Runs from the source tree
# (scripts/srcpath.sh). DALI runs only where `import nvidia.dali` works (see
# ../shared/device/README.md for carrying it). The native engine's C extension (its CPU decode,
# part c's 16-worker line) is used when built here or carried in .devwheels/jpeg
# (scripts/stage-jpeg.sh, then scripts/jpegpath.sh finds it); without it that line measures the
# Pillow fallback, and the log says so.
set -uo pipefail
part=${1:-}
case "$part" in a|b|c) ;; *) echo "usage: benchmarks/gpu.sh a|b|c" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
. scripts/srcpath.sh
export PYTHONUNBUFFERED=1
export TRICKS_CACHE=${TRICKS_CACHE:-/tmp/tricks-cache}
OUT=${OUT:-gpu-out}
py=${PYTHON:-python3}
budget=${PART_BUDGET:-540}
if [ "${QUICK:-0}" = 1 ]; then
  # the same stages with small models and inputs (the ResNet-50s run at < 1 image/s here)
  images=256 workers=2 many_workers=2 size=(--size 32) timing=(--warmup 1 --windows 2 --steps 2)
  batches=(--baseline-batch 4 --efficient-batch 8) main=resnet18,resnet18d fed=resnet18
  rest=resnet18 compile_model=resnet18
  loader=(--images 128 --batch 32 --runs 1) augment=(--batch 4 --size 64 --runs 2)
  tests=(tests/test_no_sync.py tests/test_cuda_paths.py)
  # the CPU is ~100× slower: the limits scale (a rehearsal checks the flow, not the budget)
  scale=${QUICK_SCALE:-10}
  budget=${PART_BUDGET:-$((540 * scale))}
else
  # 8,192 images at batch 1,024: 8 batches an epoch; a window of 6 steps after 2 refill steps
  # fills one epoch exactly, so no window contains an engine restart
  images=8192 workers=14 many_workers=16 size=() timing=(--warmup 8 --windows 5 --steps 6)
  batches=() main=resnet50,resnet50d fed=resnet50 rest=inception_v3,mobilenet_v1,resnet18
  compile_model=resnet50
  loader=(--images 2048 --batch 256 --runs 2) augment=() tests=(tests)
  scale=1
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
  tar -czf "$OUT/.part-$part.tar.gz" -C "$(dirname "$R")" "part-$part" 2>/dev/null &&
    mv "$OUT/.part-$part.tar.gz" "$OUT/part-$part.tar.gz"
}
skip() {  # skip NAME REASON: recorded like a stage
  printf '%s\t0\tskipped: %s\n' "$1" "$2" >> "$stages"
  say "skip $1: $2"
}
stage() {  # stage NAME LIMIT command…: run under timeout, log, time; a failure or a timeout is
  # logged and the part goes on; LIMIT (seconds, × the QUICK scale) is cut to the part's budget
  local name=$1 limit=$(($2 * scale)) t0=$SECONDS status=ok left saver
  shift 2
  left=$((budget - (SECONDS - start) - 15))
  if [ "$left" -lt 20 ]; then skip "$name" "no time left in the part's ${budget}-s budget"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "start $name (limit $limit s)"
  # the archive every 30 s while the stage runs; on TERM the saver ends between two saves
  ( trap 'kill $! 2>/dev/null; exit' TERM; while :; do sleep 30 & wait $!; save; done ) &
  saver=$!
  # timeout signals the command's whole process group (its worker processes too)
  timeout -k 10 "$limit" "$@" > "$R/$name.log" 2>&1
  rc=$?
  case $rc in
    0) ;;
    124|137) status="timed out after $limit s" ;;
    *) status="failed ($rc)" ;;
  esac
  kill "$saver" 2>/dev/null; wait "$saver" 2>/dev/null
  tail -n 25 "$R/$name.log" >> "$log"
  printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$status" >> "$stages"
  say "end $name: $status, $((SECONDS - t0)) s"
  save
}
table() { [ -f "$R/$1/train.md" ] && cp "$R/$1/train.md" "$OUT/$2" || true; }

say "part $part on $(hostname)"
# preflight: what this machine is, in the log and in the archive
{ command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ||
    echo "nvidia-smi: none"
  $py - <<'PY'
import importlib.metadata as md
import sys

import torch
import torchvision

from tricks.train.compiler import find_compiler, missing_compiler


def version(dist, module):
    try:
        __import__(module)
        return md.version(dist)
    except Exception as e:  # not installed, or its import fails here
        return f"none ({type(e).__name__})"


dali = next((version(d, "nvidia.dali") for d in ("nvidia-dali-cuda130", "nvidia-dali-cuda120")
             if version(d, "nvidia.dali")[:4] != "none"), version("nvidia-dali", "nvidia.dali"))
cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torchvision",
      torchvision.__version__, "| CUDA", torch.version.cuda, "| cuDNN",
      torch.backends.cudnn.version())
print("device:", torch.cuda.get_device_name(0) if cuda else "CPU (no CUDA)")
print("DALI:", dali, "| FFCV:", version("ffcv", "ffcv"))
print("compiler for torch.compile:", find_compiler(device) or missing_compiler(device))
PY
} 2>&1 | tee "$R/preflight.log" | tee -a "$log"

PYTHON=$py . scripts/jpegpath.sh > "$R/jpeg.log" 2>&1
say "$(cat "$R/jpeg.log")"
engines=native
if $py -c 'import nvidia.dali' >/dev/null 2>&1; then
  engines=native,dali
else
  say "no DALI here (import nvidia.dali failed): native engine only"
fi
no_compiler=$($py -c 'import torch; from tricks.train.compiler import missing_compiler
print(missing_compiler("cuda" if torch.cuda.is_available() else "cpu") or "")' 2>/dev/null) ||
  no_compiler="the compiler check failed to run (see the preflight)"

# generated ImageNet-sized JPEGs, converted; kept in $TRICKS_CACHE between parts
cat > "$R/jpegs.py" <<'PY'
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
records="$TRICKS_CACHE/bench/records-jpegs-$images"
# a command, not a function: `timeout` runs it
bench=($py -m tricks.benchmarks.throughput "${size[@]}" "${batches[@]}" "${timing[@]}")

case "$part" in
a)
  # synthetic: 8 configurations of ~10-16 s (38 steps + cuDNN autotuning; strict FP32 is the
  # slowest baseline) ~115 s; JPEGs ~60 s; fed: 4 configurations of 48 steps at batch 1,024
  # (8 warm-up, 5 × (2 refill + 6 timed)) ~25 s each, ~100 s
  stage synthetic 200 "${bench[@]}" --models "$main" --modes baseline,baseline-strict,efficient,efficient-stack \
    --out "$R/synthetic"
  table synthetic table3-a-synthetic.md
  stage jpegs 120 $py "$R/jpegs.py" "$images" "$workers"
  reuse=()
  [ -f "$R/synthetic/train.json" ] && reuse=(--synthetic-from "$R/synthetic/train.json")
  stage data 160 "${bench[@]}" --models "$fed" --modes efficient,efficient-stack --data "$records" \
    --engines "$engines" --workers "$workers" "${reuse[@]}" --out "$R/data"
  table data table3-a-data.md
  ;;
b)
  # rest: 9 configurations of ~8-15 s, ~100 s; compile: efficient ~15 s, then two
  # torch.compile runs of ~60-100 s each (Triton compilation), ~200 s
  stage rest 160 "${bench[@]}" --models "$rest" --modes baseline,baseline-strict,efficient --out "$R/rest"
  table rest table3-b-rest.md
  if [ -n "$no_compiler" ]; then
    skip compile "$no_compiler"
  else
    stage compile 260 "${bench[@]}" --models "$compile_model" \
      --modes efficient,efficient-compile,efficient-graphs --out "$R/compile"
    table compile table3-b-compile.md
  fi
  ;;
c)
  # tests ~90 s, and ~90 s more for the compiled-step tests (three small compilations; they
  # skip without a compiler, saying so); loader (2,048 photographs: making them ~30 s, then
  # 4 cells × 5 engines × 3 windows and their set-up) ~90 s; the native CPU decode with 16
  # workers ~20 s; augment ~30 s. The loader JSONs are written after each cell.
  stage cuda-tests 240 $py -m pytest -q -rs -m gpu -p no:cacheprovider "${tests[@]}"
  stage loader 150 $py -m tricks.benchmarks.loader "${loader[@]}" --workers "$workers" \
    --out "$R/loader"
  stage loader-cpu-decode 60 $py -m tricks.benchmarks.loader "${loader[@]}" --runs 1 \
    --engines native --decode workers --workers "$many_workers" --out "$R/loader-cpu-decode"
  stage augment 60 $py -m tricks.benchmarks.augment "${augment[@]}" --out "$R/augment"
  ;;
esac
say "part $part done in $((SECONDS - start)) s"
save
