#!/usr/bin/env bash
# Set-up (as scripts/setup.sh) then the whole test suite, two workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -n 2 --durations=15 "$@"
