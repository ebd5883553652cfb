#!/usr/bin/env bash
# Set up what is missing, then run the test suite. pytest's exit 5 (no tests ran) is a failure.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh" || exit 1
cd "$root"
.venv/bin/python -m pytest "$@"
rc=$?
[ $rc -eq 5 ] && echo "test.sh: pytest collected no tests" >&2
exit $rc
