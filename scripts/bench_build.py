"""One model of the benchmark (scripts/bench.py), built in a process of its own.

    python scripts/bench_build.py MODEL OUT [TARGET_CPU]

MODEL is a name from MODELS (a zoo CNN of configs/bench/vision.py or the `minilm` encoder of
configs/bench/text.py) or a recipe path. The zoo CNNs need torchvision/timm: bench.py runs this
with tests/zoo_site and .venv/zoo first on PYTHONPATH (transformers breaks beside that
torchvision, so the encoder's process has neither).

Writes under OUT: quantcli's work folder and int8 model (`quantcli run` on the model's recipe),
fp32.onnx (quantcli's captured fp32 program through the same exporter), fp32.pre.onnx (ORT's
`quant_pre_process` of it), the ORT flows' models, held_out.npz (inputs for timing and fidelity)
and build.json, which names them all and records how they were made. TARGET_CPU (auto, avx2,
avx512, vnni) sets the recipe's quantization.target_cpu: a model for any target builds on any
machine, but its latency means something only on that target's CPU.

ORT's flows, as its documentation recommends them:
  - CNNs: `quantize_static` (QDQ, per-channel, uint8 activations, int8 weights, reduce_range where
    the target's u8 x s8 kernels saturate (ORT's only remedy), quantcli's calibration data, ORT's
    default MinMax);
  - encoder: `quantize_dynamic`, ORT's method for transformers, as its documentation's example
    calls it (QInt8 weights, per-tensor), and with per_channel=True (reduce_range as above, which
    ORT's FAQ asks for with per-channel on AVX2/AVX-512 without VNNI).
ORT's docs also suggest its transformer optimizer before quantizing (for QAttention); on this
dynamo-exported graph `optimize_model(model_type="bert")` fuses no Attention (only BiasGelu and
SkipLayerNormalization, which the session's own optimizations do too), so it is not a flow here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "configs" / "bench"
ENCODER = "minilm"


def _vision_names() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location("bench_vision", BENCH / "vision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # numpy only at import time
    return module.MODELS


VISION = _vision_names()
MODELS = (*VISION, ENCODER)


def recipe_file(model: str, out: Path, target_cpu: str = "auto") -> Path:
    """The recipe of a bench model (vision.yaml with its name, encoder.yaml) or a recipe path, for `target_cpu`."""
    import yaml

    from quantcli.recipe import load

    source = BENCH / "encoder.yaml" if model == ENCODER else Path(model).resolve()
    if model in VISION:
        source = BENCH / "vision.yaml"
    recipe = load(source)  # file references made absolute: the copy lives in `out`
    if model in VISION:
        recipe = recipe.model_copy(
            update={
                "model": recipe.model.model_copy(
                    update={"factory": f"{BENCH / 'vision.py'}:build", "kwargs": {"name": model}}
                )
            }
        )
    quantization = recipe.quantization.model_copy(update={"target_cpu": target_cpu})
    recipe = recipe.model_copy(update={"quantization": quantization})
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return path


def quantcli_model(recipe: Path, out: Path) -> dict:
    """Run quantcli's pipeline and export its fp32 program; the paths, resolved recipe and parity."""
    from quantcli import pipeline
    from quantcli.errors import NumericsError

    work, start, parity = out / "quantcli", time.perf_counter(), "passed"
    try:
        pipeline.run(recipe, work, force=True)
    except NumericsError as exc:  # the model is written; a benchmark reports it and measures on
        parity = f"failed: {exc}"
    seconds = time.perf_counter() - start
    fp32, recipe = fp32_onnx(work, out / "fp32.onnx")
    return {
        "int8": work / "model.onnx",
        "fp32": fp32,
        "recipe": recipe,
        "parity": parity,
        "pipeline_seconds": round(seconds, 1),
    }


def fp32_onnx(work: Path, path: Path) -> tuple[Path, dict]:
    """quantcli's captured fp32 program (in a `quantcli run` folder) through the same exporter at the recipe's
    opset, and the resolved recipe the conversion recorded.

    The exporter's own decompositions fail on the fp32 programs of some transformers (T5, BEiT, Swin:
    a reshape of the transposed attention output becomes a view it cannot take with a dynamic batch);
    those are decomposed to core ATen first, which exports and runs as the program does."""
    import onnx

    from quantcli import _torch
    from quantcli.errors import ModelError
    from quantcli.onnx import export as onnx_export

    manifest = json.loads((work / "converted" / "manifest.json").read_text())
    io = manifest["io"]
    program = _torch.load_program(work / "converted" / "float.pt2")
    opset = manifest["recipe"]["export"]["opset"]  # quantcli's own: at 18, GELU is five float ops for ORT too
    names = {"opset": opset, "input_names": io["inputs"], "output_names": io["outputs"]}
    try:
        fp32 = onnx_export.to_onnx(program, **names)
    except ModelError:
        fp32 = onnx_export.to_onnx(program.run_decompositions(), **names)
    onnx.save(fp32, str(path))
    return path, manifest["recipe"]


def pre_process(fp32: Path, out: Path) -> tuple[Path, str]:
    """ORT's quant_pre_process; where its symbolic shape inference fails, again without it (noted)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32), str(out))
        return out, "quant_pre_process"
    except Exception as exc:
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return out, f"quant_pre_process, skip_symbolic_shape=True (symbolic shape inference failed: {first})"


def static_flow(pre: Path, recipe: dict, out: Path) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from quantcli.loading.data import iter_batches
    from quantcli.loading.files import reader
    from quantcli.quantizers.cpu import saturates_u8s8
    from quantcli.recipe import Recipe

    r = Recipe.model_validate(recipe)
    names = [i.name for i in r.inputs]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            cal = r.calibration
            self.batches = iter_batches(
                cal.data,
                cal.keys,
                r.inputs,
                cal.batch_size,
                cal.num_batches,
                "calibration",
                files=reader(r, "calibration"),
            )[1]

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {n: batch[n] for n in names}

    path = out / "quantize_static.onnx"
    quantize_static(
        str(pre),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=saturates_u8s8(r.quantization.target_cpu),
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return {"quantize_static": path}


def dynamic_flows(pre: Path, recipe: dict, out: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from quantcli.quantizers.cpu import saturates_u8s8

    default, per_channel = out / "quantize_dynamic.onnx", out / "quantize_dynamic_pc.onnx"
    quantize_dynamic(str(pre), str(default), weight_type=QuantType.QInt8)
    quantize_dynamic(
        str(pre),
        str(per_channel),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=saturates_u8s8(recipe["quantization"]["target_cpu"]),
    )
    return {"quantize_dynamic": default, "quantize_dynamic_pc": per_channel}


def held_out(model: str, recipe: dict) -> tuple[dict[str, np.ndarray], str]:
    """Inputs the calibration did not see (for timing feeds and fidelity), and what they are."""
    from quantcli.loading.factory import load_callable

    if model == ENCODER:
        return load_callable(f"{BENCH / 'text.py'}:held_out", "bench")(), "256 token sequences (seed 1)"
    if model in VISION:
        return {"x": load_callable(f"{BENCH / 'vision.py'}:photos", "bench")(64, seed=7)}, "64 photo crops (seed 7)"
    from quantcli.loading.data import iter_batches
    from quantcli.loading.files import reader
    from quantcli.recipe import Recipe

    r = Recipe.model_validate(recipe)
    section, what, count = (r.evaluation, "evaluation", None) if r.evaluation else (r.calibration, "calibration", 4)
    batches = list(
        iter_batches(section.data, section.keys, r.inputs, section.batch_size, count, what, files=reader(r, what))[1]
    )
    note = "the recipe's evaluation data" if r.evaluation else "calibration data (not held out)"
    return {i.name: np.concatenate([b[i.name] for b in batches]) for i in r.inputs}, note


def planted(model: str, rows: dict[str, np.ndarray]) -> dict | None:
    """The encoder's measured activation ranges (outlier vs other channels) on held-out rows."""
    if model != ENCODER:
        return None
    from quantcli.loading.factory import load_callable

    encoder = load_callable(f"{BENCH / 'text.py'}:encoder", "bench")()
    ranges = load_callable(f"{BENCH / 'text.py'}:activation_ranges", "bench")
    return ranges(encoder, {k: v[:64] for k, v in rows.items()})


def build(model: str, out: Path, target_cpu: str = "auto") -> None:
    """Every model file, the held-out inputs and build.json under `out`, quantcli's model for `target_cpu`."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" advice
    out.mkdir(parents=True, exist_ok=True)
    q = quantcli_model(recipe_file(model, out, target_cpu), out)
    pre, pre_note = pre_process(q["fp32"], out / "fp32.pre.onnx")
    flows = dynamic_flows(pre, q["recipe"], out) if model == ENCODER else static_flow(pre, q["recipe"], out)
    rows, rows_note = held_out(model, q["recipe"])
    np.savez(out / "held_out.npz", **rows)
    quant = q["recipe"]["quantization"]
    info = {
        "model": model,
        "sessions": {"fp32": str(q["fp32"]), **{k: str(v) for k, v in flows.items()}, "quantcli": str(q["int8"])},
        "ort_flows": list(flows),
        "pre_process": pre_note,
        "held_out": rows_note,
        "parity": q["parity"],
        "reduce_range": quant["reduce_range"],
        "target_cpu": quant["target_cpu"],
        "equalize": quant.get("equalize"),
        "pipeline_seconds": q["pipeline_seconds"],
        "planted": planted(model, rows),
    }
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    build(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
