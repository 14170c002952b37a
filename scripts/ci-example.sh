#!/usr/bin/env bash
# Using quantcli in CI: recipe -> int8 ONNX, one stage per process.
#
#   scripts/ci-example.sh RECIPE.yaml WORK_DIR
#
# - `quantcli validate` fails fast on a bad recipe (unknown key, invalid value, missing file)
#   without importing torch, before any heavy work.
# - Each stage writes a complete artifact folder or nothing (temporary folder, then rename);
#   loading checks the sha256 of every file. Keep WORK_DIR in the CI cache: a rerun with the same
#   recipe, model, data and quantcli version reuses every stage ("reused", exit 0) and gives a
#   byte-identical model.onnx. A stage whose output was made from other inputs exits 4: pass
#   --force to replace it, or start from an empty WORK_DIR.
# - Results are read from JSON (`--json`: exactly one JSON document on stdout), never from logs.
#
# Exit codes (stable); every error is one line on stderr (`--debug` adds the traceback):
#   0 success                 3 input error: a missing file, the model factory, the data
#   1 internal error          4 artifact error: wrong stage, corrupt, output may not be replaced
#   2 usage or recipe error   5 parity check failed: model and report written, marked failed
#   6 tune: accuracy goal not met; the best model, its recipe and tune.json are written
#   130 interrupted: nothing partial is left
set -euo pipefail

recipe=${1:?usage: ci-example.sh RECIPE.yaml WORK_DIR}
work=${2:?usage: ci-example.sh RECIPE.yaml WORK_DIR}

quantcli validate "$recipe" --quiet

quantcli capture   --recipe "$recipe"  -o "$work/captured"
quantcli prepare   "$work/captured"    -o "$work/prepared"
quantcli calibrate "$work/prepared"    -o "$work/calibrated"
quantcli convert   "$work/calibrated"  -o "$work/converted"

# Export checks ONNX Runtime against PyTorch; exit 5 means the model was written but failed parity.
status=0
quantcli export "$work/converted" -o "$work/model.onnx" --json > "$work/export.json" || status=$?
if [ "$status" -eq 5 ]; then
  echo "parity check failed: see $work/model.report.json" >&2
fi
[ "$status" -eq 0 ] || exit "$status"

# Read the results: the export result (JSON on stdout above) and the report beside the model.
python3 - "$work/export.json" "$work/model.report.json" <<'EOF'
import json, sys

result, report = (json.load(open(path)) for path in sys.argv[1:3])
line = [f"{result['out']}: {'reused' if result['reused'] else 'written'}",
        f"parity {report['parity']['min_sqnr_db']:.1f} dB"]
if "evaluation" in report:
    evaluation = report["evaluation"]
    line.append(f"{evaluation['metric']} int8 {evaluation['int8_onnx']:.4f} (fp32 {evaluation['fp32_torch']:.4f})")
print(", ".join(line))
EOF
