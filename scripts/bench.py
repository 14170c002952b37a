"""Benchmark: ONNX Runtime latency of quantcli's int8 ONNX vs onnxruntime.quantization.quantize_static.

For each CNN recipe, quantcli runs its whole pipeline; the same fp32 model (the captured program,
exported by the same exporter) is quantized by `quantize_static` (QDQ, uint8 activations, int8
per-channel weights, reduce_range as quantcli resolved it) on the same calibration data. The
sessions (fp32, quantize_static, quantcli) are then timed interleaved, round after round, in one
run, at batch 1 and 32 with 2 threads and spinning off; the medians and the median ratio
quantcli / quantize_static are printed (ratio <= 1.05 means quantcli's model is as fast).

    python scripts/bench.py [--rounds 15] [--json out.json] [recipe.yaml ...]

A benchmark, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [ROOT / "configs/digits/recipe.yaml", ROOT / "configs/resnet/recipe.yaml",
           ROOT / "configs/mobilenet/recipe.yaml"]


def quantcli_model(recipe: Path, work: Path) -> tuple[Path, Path, dict]:
    """Run quantcli's pipeline; return (int8 onnx, fp32 onnx, resolved recipe)."""
    import onnx

    from quantcli import pipeline
    from quantcli import _torch
    from quantcli.onnx import export as onnx_export

    results = pipeline.run(recipe, work, force=True)
    manifest = results[-1].manifest
    float_program = _torch.load_program(work / "converted" / "float.pt2")
    model = onnx_export.to_onnx(float_program, opset=18, input_names=manifest["io"]["inputs"],
                                output_names=manifest["io"]["outputs"])
    fp32 = work / "fp32.onnx"
    onnx.save(model, str(fp32))
    return work / "model.onnx", fp32, manifest["recipe"]


def static_model(fp32: Path, recipe: dict, out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from quantcli.loading.data import iter_batches
    from quantcli.recipe import Recipe

    r = Recipe.model_validate(recipe)
    cal = r.calibration

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter_batches(cal.data, cal.keys, r.inputs, cal.batch_size, cal.num_batches,
                                        "calibration")[1]

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=bool(r.quantization.reduce_range), activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return out


def feeds(recipe: dict, batch: int) -> dict[str, np.ndarray]:
    from quantcli.loading.inputs import synthetic
    from quantcli.recipe import Recipe

    r = Recipe.model_validate(recipe)
    specs = [i.model_copy(update={"shape": [batch, *i.shape[1:]]}) for i in r.inputs]
    return synthetic(specs, seed=0)


def interleaved(sessions: dict[str, object], feed: dict, rounds: int, per_round: int) -> dict[str, float]:
    """Median ms per run of each session, timed round-robin so load drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, feed)
    for _ in range(rounds):
        for name, sess in sessions.items():
            start = time.perf_counter()
            for _ in range(per_round):
                sess.run(None, feed)
            times[name].append((time.perf_counter() - start) * 1000 / per_round)
    return {name: statistics.median(t) for name, t in times.items()}


def bench(recipe: Path, rounds: int) -> dict:
    from quantcli.onnx import runtime

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "w"
        int8, fp32, resolved = quantcli_model(recipe, work)
        static = static_model(fp32, resolved, Path(tmp) / "static.onnx")
        sessions = {name: runtime.session(path, threads=2)
                    for name, path in [("fp32", fp32), ("quantize_static", static), ("quantcli", int8)]}
        result = {"recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe)}
        for batch in (1, 32):
            med = interleaved(sessions, feeds(resolved, batch), rounds, per_round=20 if batch == 1 else 3)
            result[f"batch_{batch}"] = {**{k: round(v, 3) for k, v in med.items()},
                                        "ratio_vs_static": round(med["quantcli"] / med["quantize_static"], 3),
                                        "speedup_vs_fp32": round(med["fp32"] / med["quantcli"], 3)}
    return result


def main() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" advice
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", type=Path, default=DEFAULT)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [bench(r.resolve(), args.rounds) for r in args.recipes]
    print(f"{'recipe':34} {'batch':>5} {'fp32 ms':>9} {'static ms':>9} {'quantcli ms':>11} {'ratio':>6} {'vs fp32':>7}")
    for row in rows:
        for batch in (1, 32):
            b = row[f"batch_{batch}"]
            print(f"{row['recipe']:34} {batch:>5} {b['fp32']:>9.3f} {b['quantize_static']:>9.3f} "
                  f"{b['quantcli']:>11.3f} {b['ratio_vs_static']:>6.3f} {b['speedup_vs_fp32']:>6.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
