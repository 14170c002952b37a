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
# torchvision and timm for the model-zoo tests, kept out of the main environment (they would break
# transformers there): see tests/zoo_site/sitecustomize.py. --no-deps: never another torch.
if [ ! -d .venv/zoo/torchvision-0.28.0.dist-info ] || [ ! -d .venv/zoo/timm-1.0.31.dist-info ]; then
  rm -rf .venv/zoo
  python -m pip install -q --disable-pip-version-check --no-deps --target .venv/zoo "torchvision==0.28.0" "timm==1.0.31"
fi
# The project's own bytecode, written once: pip compiles what it installs, but not an editable install's
# source, and where PYTHONDONTWRITEBYTECODE is set every quantcli process would compile its modules anew
# (1.2 s of each process's start-up, measured). compileall skips what is current; a .pyc older than its
# source is never used.
python -m compileall -q quantcli tests scripts configs
