#!/usr/bin/env bash
# Creates .venv if missing and installs quantcli with its test dependencies (CPU torch only).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
# --no-compile: pip would compile each package's bytecode one file at a time; the end of this script compiles
# it all on every core.
pip_install() { python -m pip install -q --disable-pip-version-check --no-compile "$@"; }
# torch first and pinned: the CPU wheel; an unpinned torch could pull a multi-GB CUDA build.
pip_install "torch==2.13.0"
pip_install -e ".[test]"
# torchvision and timm for the model-zoo tests, kept out of the main environment (they would break
# transformers there): see tests/zoo_site/sitecustomize.py. --no-deps: never another torch.
if [ ! -d .venv/zoo/torchvision-0.28.0.dist-info ] || [ ! -d .venv/zoo/timm-1.0.31.dist-info ]; then
  rm -rf .venv/zoo
  pip_install --no-deps --target .venv/zoo "torchvision==0.28.0" "timm==1.0.31"
fi
# Bytecode, written here once: where PYTHONDONTWRITEBYTECODE is set no process writes its own, and every
# quantcli process the tests start would compile what it imports anew (the project's modules alone: 1.2 s of
# each start-up, measured). The installed packages are compiled when something newer than the last pass is
# there; the project every time (compileall skips what is current; a .pyc older than its source is never used).
# A few files parse only on newer Pythons (torch's py312 test helpers) and stay source: errors are not fatal.
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -f .venv/.compiled ] || [ -n "$(find "$site" .venv/zoo -newer .venv/.compiled -name '*.py' ! -name '__editable__*' -print -quit)" ]; then
  python -m compileall -qq -j 0 "$site" .venv/zoo > /dev/null || true
  touch .venv/.compiled
fi
python -m compileall -q quantcli tests scripts configs
