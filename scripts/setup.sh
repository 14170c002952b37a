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
# Bytecode. Where PYTHONDONTWRITEBYTECODE is set no process writes its own, and each quantcli process would compile
# what it imports anew (the project's modules alone: 1.2 s of each start-up, measured). What quantcli's commands
# import (torch, torchao, the ONNX exporter, ONNX Runtime, transformers), and what every test worker imports as it
# collects, is compiled here by importing it once with bytecode writing on, where compiling every installed package
# took 32 s (measured, two cores), mostly on modules nothing imports; scripts/test.sh lets the test processes write
# the rest they import, once. Two processes, one a core: what imports torch, and the tests' libraries that do not
# (13.5 s against 21.3 s one after the other, measured from cold bytecode).
PYTHONDONTWRITEBYTECODE= python - <<'EOF' &
import importlib
import pkgutil

import quantcli

for module in pkgutil.walk_packages(quantcli.__path__, "quantcli."):
    if module.name != "quantcli.__main__":
        importlib.import_module(module.name)
for name in ("torch._export.serde.serialize", "torch.onnx._internal.exporter._core", "onnxruntime", "transformers"):
    importlib.import_module(name)
EOF
torch_stack=$!
PYTHONDONTWRITEBYTECODE= python - <<'EOF'
import importlib
import sys

for name in ("datasets", "sklearn.datasets", "hypothesis", "onnxruntime_genai"):  # the tests'
    importlib.import_module(name)
assert "torch" not in sys.modules, "compiled twice at once: move it to the torch process"
EOF
wait "$torch_stack"
python -m compileall -q quantcli tests scripts configs
