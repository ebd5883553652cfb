#!/usr/bin/env bash
# The main job: set up what is missing, then train a small ResNet-D on the embedded synthetic
# dataset (made once and cached), evaluate it, and print where the run went.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/tricks train "$@"
