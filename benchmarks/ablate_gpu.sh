#!/usr/bin/env bash
# The prepared GPU ablation (Table 6 on CIFAR-10, one H100/H200, within about 6 minutes):
# ResNet-18-D with the CIFAR stem, full 50,000/10,000 split, 3 seeds, a ResNet-34-D teacher.
# Needs the CIFAR-10 tarball (CIFAR=path; default ../shared/data/cifar10-jpg.tar.gz, carry it
# into the repo for the device). $OUT gets the table (Markdown, JSON, PNG).
#     CIFAR=shared/cifar10-jpg.tar.gz OUT=/tmp/out bash benchmarks/ablate_gpu.sh
# QUICK=1: a 500/100-per-class subset and 2 epochs, for a rehearsal on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/srcpath.sh
export PYTHONUNBUFFERED=1
export TRICKS_CACHE=${TRICKS_CACHE:-/tmp/tricks-cache}
OUT=${OUT:-ablate-out}
CIFAR=${CIFAR:-../shared/data/cifar10-jpg.tar.gz}
py=${PYTHON:-python3}
work=$(mktemp -d)
if [ "${QUICK:-0}" = 1 ]; then
  subset=(--train 500 --test 100) epochs=2 workers=2 batch=128 precision=fp32 width=16
else
  subset=() epochs=6 workers=14 batch=512 precision=fp16 width=64
fi
tree=$($py -m tricks.benchmarks.cifar10 "$CIFAR" "$work/tree" "${subset[@]}" | tail -1)
$py -m tricks.train.cli convert "$tree" "$work/cifar10" --workers "$workers" | tail -3
# the cifar preset: CIFAR stem, pad-and-crop with flips, whole-image evaluation, cosine
$py -m tricks.train.cli ablate --table 6 --seeds 3 --out "$OUT" -c cifar \
    data.path="$work/cifar10" data.workers="$workers" model.width="$width" \
    train.epochs="$epochs" train.batch="$batch" train.precision="$precision"
rm -rf "$OUT/runs"  # checkpoints: keep $OUT to the table's few files (the device returns ≤ 8)
