#!/usr/bin/env bash
# Creates .venv if missing and installs quantcli with its test dependencies (CPU torch only).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
# torch first and pinned: the CPU wheel; an unpinned torch could pull a multi-GB CUDA build.
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[test]"
