#!/usr/bin/env bash
# Set-up (as scripts/setup.sh), then the whole pipeline on the bundled digits example, each stage a
# separate process as a CI script would run it, then the report: fp32 vs int8 accuracy, sizes, latency.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
W=runs/digits
R=configs/digits/recipe.yaml
quantcli capture   --recipe "$R" -o "$W/captured"    --force
quantcli prepare   "$W/captured"   -o "$W/prepared"   --force
quantcli calibrate "$W/prepared"   -o "$W/calibrated" --force
quantcli convert   "$W/calibrated" -o "$W/converted"  --force
quantcli export    "$W/converted"  -o "$W/model.onnx" --force
echo
echo "== post-training quantization (PTQ) =="
quantcli inspect "$W/model.onnx"
if [ -f configs/digits/qat.yaml ]; then
  echo
  echo "== quantization-aware training (QAT) =="
  quantcli run --recipe configs/digits/qat.yaml -o runs/digits-qat --force --quiet >/dev/null
  quantcli inspect runs/digits-qat/model.onnx
fi
