"""Benchmark: ONNX Runtime latency and fidelity of quantcli's int8 model against ORT's own quantization flows.

Models (`--models`, default all): the zoo CNNs of configs/bench/vision.py at 224 px (torchvision
ResNet-18, MobileNetV2, MobileNetV3-Large, EfficientNet-B0, ShuffleNetV2 x1.0, RegNetX-400MF,
ConvNeXt-Tiny, timm tf_efficientnet_lite0) and `minilm`, the MiniLM-sized sentence encoder of
configs/bench/text.py; positional arguments add any other recipe.

Each model is built in a child process (the CNNs with tests/zoo_site and .venv/zoo on PYTHONPATH,
which torchvision and timm need): quantcli's pipeline (`quantcli run`) gives the int8 model and the
fp32 program, which the same exporter turns into the fp32 ONNX. ONNX Runtime's recommended flow
quantizes that fp32 ONNX after `quant_pre_process`:
  - CNNs: `quantize_static` (QDQ, per-channel, uint8 activations, int8 weights, reduce_range as
    quantcli resolved it for this CPU, quantcli's calibration data, ORT's default MinMax);
  - encoder: `quantize_dynamic`, ORT's method for transformers, as its documentation's example
    calls it (QInt8 weights, per-tensor) and with per_channel=True (reduce_range as above, which
    ORT's FAQ asks for with per-channel on AVX2/AVX-512 without VNNI).
This process then times every session of a model (fp32, ORT flows, quantcli) interleaved, round
after round, at batch 1 and 32 with 2 threads and spinning off, and reports medians, the ratio
quantcli / ORT flow (below 1: quantcli faster) and the speed-up over fp32. Fidelity: cosine
similarity of each int8 model's outputs to fp32's on held-out inputs (photo crops; 256 token
sequences), raw and on outputs standardized per dimension with fp32's mean and std over those
inputs (the input-dependent part, every dimension weighing alike).

    python scripts/bench.py [--models resnet18,minilm] [--rounds 15] [--json out.json] [--work DIR [--reuse]]

A benchmark, not a test: it asserts nothing, and its numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "configs" / "bench"
ZOO_PATH = [ROOT / "tests" / "zoo_site", ROOT / ".venv" / "zoo"]
ENCODER = "minilm"
THREADS = 2
ROUND_SECONDS = 0.25  # each session runs about this long per round (at least one run)


def _vision_names() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location("bench_vision", BENCH / "vision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # numpy only at import time
    return module.MODELS


VISION = _vision_names()


# ---------------------------------------------------------------- build (child process)

def recipe_file(model: str, out: Path) -> Path:
    """The recipe of a bench model (vision.yaml with its name, encoder.yaml) or a recipe path."""
    import yaml

    if model == ENCODER:
        return BENCH / "encoder.yaml"
    if model not in VISION:
        return Path(model).resolve()
    recipe = yaml.safe_load((BENCH / "vision.yaml").read_text())
    recipe["model"].update(factory=f"{BENCH / 'vision.py'}:build", kwargs={"name": model})
    recipe["calibration"]["data"] = f"{BENCH / 'vision.py'}:calibration"
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def quantcli_model(recipe: Path, out: Path) -> dict:
    """Run quantcli's pipeline and export its fp32 program; the paths, resolved recipe and parity."""
    import onnx

    from quantcli import _torch, pipeline
    from quantcli.errors import NumericsError
    from quantcli.onnx import export as onnx_export

    work, start, parity = out / "quantcli", time.perf_counter(), "passed"
    try:
        pipeline.run(recipe, work, force=True)
    except NumericsError as exc:  # the model is written; a benchmark reports it and measures on
        parity = f"failed: {exc}"
    manifest = json.loads((work / "converted" / "manifest.json").read_text())
    seconds = time.perf_counter() - start
    io = manifest["io"]
    fp32 = onnx_export.to_onnx(_torch.load_program(work / "converted" / "float.pt2"), opset=18,
                               input_names=io["inputs"], output_names=io["outputs"])
    onnx.save(fp32, str(out / "fp32.onnx"))
    return {"int8": work / "model.onnx", "fp32": out / "fp32.onnx", "recipe": manifest["recipe"],
            "parity": parity, "pipeline_seconds": round(seconds, 1)}


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
    from quantcli.recipe import Recipe

    r = Recipe.model_validate(recipe)
    names = [i.name for i in r.inputs]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            cal = r.calibration
            self.batches = iter_batches(cal.data, cal.keys, r.inputs, cal.batch_size, cal.num_batches,
                                        "calibration")[1]

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {n: batch[n] for n in names}

    path = out / "quantize_static.onnx"
    quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=bool(r.quantization.reduce_range), activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return {"quantize_static": path}


def dynamic_flows(pre: Path, recipe: dict, out: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    default, per_channel = out / "quantize_dynamic.onnx", out / "quantize_dynamic_pc.onnx"
    quantize_dynamic(str(pre), str(default), weight_type=QuantType.QInt8)
    quantize_dynamic(str(pre), str(per_channel), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=bool(recipe["quantization"]["reduce_range"]))
    return {"quantize_dynamic": default, "quantize_dynamic_pc": per_channel}


def held_out(model: str, recipe: dict) -> tuple[dict[str, np.ndarray], str]:
    """Inputs the calibration did not see (for timing feeds and fidelity), and what they are."""
    from quantcli.loading.factory import load_callable

    if model == ENCODER:
        return load_callable(f"{BENCH / 'text.py'}:held_out", "bench")(), "256 token sequences (seed 1)"
    if model in VISION:
        return {"x": load_callable(f"{BENCH / 'vision.py'}:photos", "bench")(64, seed=7)}, "64 photo crops (seed 7)"
    from quantcli.loading.data import iter_batches
    from quantcli.recipe import Recipe

    r = Recipe.model_validate(recipe)
    cal = r.calibration
    batches = list(iter_batches(cal.data, cal.keys, r.inputs, cal.batch_size, 4, "calibration")[1])
    return {i.name: np.concatenate([b[i.name] for b in batches]) for i in r.inputs}, "calibration data (not held out)"


def planted(model: str, rows: dict[str, np.ndarray]) -> dict | None:
    """The encoder's measured activation ranges (outlier vs other channels) on held-out rows."""
    if model != ENCODER:
        return None
    from quantcli.loading.factory import load_callable

    encoder = load_callable(f"{BENCH / 'text.py'}:encoder", "bench")()
    ranges = load_callable(f"{BENCH / 'text.py'}:activation_ranges", "bench")
    return ranges(encoder, {k: v[:64] for k, v in rows.items()})


def build(model: str, out: Path) -> None:
    """Child-process entry: every model file, held-out inputs and build.json under `out`."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" advice
    out.mkdir(parents=True, exist_ok=True)
    q = quantcli_model(recipe_file(model, out), out)
    pre, pre_note = pre_process(q["fp32"], out / "fp32.pre.onnx")
    flows = dynamic_flows(pre, q["recipe"], out) if model == ENCODER else static_flow(pre, q["recipe"], out)
    rows, rows_note = held_out(model, q["recipe"])
    np.savez(out / "held_out.npz", **rows)
    quant = q["recipe"]["quantization"]
    info = {"model": model, "sessions": {"fp32": str(q["fp32"]), **{k: str(v) for k, v in flows.items()},
                                         "quantcli": str(q["int8"])},
            "ort_flows": list(flows), "pre_process": pre_note, "held_out": rows_note, "parity": q["parity"],
            "reduce_range": quant["reduce_range"], "target_cpu": quant["target_cpu"],
            "equalize": quant.get("equalize"), "pipeline_seconds": q["pipeline_seconds"],
            "planted": planted(model, rows)}
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")


def slug(model: str) -> str:
    """A model's folder name: its bench name, or <folder>-<stem> of a recipe path."""
    return model if model in (*VISION, ENCODER) else f"{Path(model).parent.name}-{Path(model).stem}"


def build_in_child(model: str, out: Path) -> dict:
    """Run `build` in a fresh process (zoo PYTHONPATH for vision models); its build.json or the error."""
    paths = [*ZOO_PATH] if model in VISION else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*paths, ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "build.log", "w") as log:
        done = subprocess.run([sys.executable, __file__, "--build", model, "--work", str(out)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (out / "build.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"model": model, "error": f"build failed (exit {done.returncode}): {tail[0]}"}
    return json.loads((out / "build.json").read_text())


# ---------------------------------------------------------------- measure (this process)

def run_all(sess, batch: dict[str, np.ndarray]) -> np.ndarray:
    return sess.run(None, {i.name: batch[i.name] for i in sess.get_inputs()})[0]


def interleaved(sessions: dict, feed: dict, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall ms per run of each session, timed round-robin so load drifts hit all alike; and
    the median CPU ms of this process per run (all threads), which waiting for a busy core does not
    inflate: a check on the wall-time ratios when the machine is shared."""
    warm = {}
    for name, sess in sessions.items():
        run_all(sess, feed)
        start = time.perf_counter()
        run_all(sess, feed)
        warm[name] = time.perf_counter() - start
    per_round = max(1, math.ceil(ROUND_SECONDS / min(warm.values())))
    wall: dict[str, list[float]] = {name: [] for name in sessions}
    cpu: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                run_all(sess, feed)
            wall[name].append((time.perf_counter() - start) * 1000 / per_round)
            cpu[name].append((time.process_time() - start_cpu) * 1000 / per_round)
    return ({name: statistics.median(t) for name, t in wall.items()},
            {name: statistics.median(t) for name, t in cpu.items()})


def cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    return (reference * other).sum(1) / np.maximum(np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1), 1e-30)


def fidelity(sessions: dict, rows: dict[str, np.ndarray], batch: int = 32) -> dict[str, dict]:
    """Cosine to fp32 per held-out row, raw and on outputs standardized per dimension with fp32's
    mean and std over the rows (every dimension weighs alike): mean and worst row. Also the share of
    fp32's output energy that varies with the input: near 0 (random-weight CNNs) the standardized
    figures compare quantization noise with noise and mean nothing."""
    n = len(next(iter(rows.values())))
    outs = {name: np.concatenate([run_all(s, {k: v[i:i + batch] for k, v in rows.items()}) for i in range(0, n, batch)])
            for name, s in sessions.items()}
    fp32 = outs.pop("fp32").reshape(n, -1).astype(np.float64)
    mean, std = fp32.mean(0), np.maximum(fp32.std(0), 1e-12)
    result = {"fp32_input_dependent_share": round(float(fp32.var(0).sum() / np.square(fp32).mean(0).sum()), 5)}
    for name, out in outs.items():
        out = out.reshape(n, -1)
        raw, standardized = cosines(fp32, out), cosines((fp32 - mean) / std, (out - mean) / std)
        result[name] = {"cos_mean": round(float(raw.mean()), 5), "cos_worst": round(float(raw.min()), 5),
                        "std_cos_mean": round(float(standardized.mean()), 5),
                        "std_cos_worst": round(float(standardized.min()), 5)}
    return result


def graph_ops(path: str) -> dict:
    """What ORT runs after its optimizations: integer vs float Conv/MatMul/Gemm, Q/DQ and all op counts."""
    from quantcli.onnx.fusion import integer_op_report

    r = integer_op_report(path)
    return {k: r[k] for k in ("integer", "float", "float_ops", "quantize", "dequantize", "op_types")}


def measure(info: dict, rounds: int) -> dict:
    from quantcli.onnx import runtime

    sessions = {name: runtime.session(path, threads=THREADS) for name, path in info["sessions"].items()}
    rows = dict(np.load(Path(info["sessions"]["fp32"]).parent / "held_out.npz"))
    result = dict(info)
    for batch in (1, 32):
        feed = {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:]))) for k, v in rows.items()}
        med, cpu = interleaved(sessions, feed, rounds)
        result[f"batch_{batch}"] = {"ms": {k: round(v, 3) for k, v in med.items()},
                                    "ratio_vs": {f: round(med["quantcli"] / med[f], 3) for f in info["ort_flows"]},
                                    "speedup_vs_fp32": {k: round(med["fp32"] / v, 3) for k, v in med.items() if k != "fp32"},
                                    "cpu_ms": {k: round(v, 3) for k, v in cpu.items()},
                                    "cpu_ratio_vs": {f: round(cpu["quantcli"] / cpu[f], 3) for f in info["ort_flows"]}}
    result["fidelity"] = fidelity(sessions, rows)
    result["ops"] = {name: graph_ops(path) for name, path in info["sessions"].items() if name != "fp32"}
    return result


def machine() -> dict:
    """CPU model and the flags that pick ORT's int8 kernels, thread count, versions."""
    from quantcli.quantizers.cpu import cpu_flags, detect_cpu

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    flags = cpu_flags(text)
    versions = {}
    for package in ("onnxruntime", "torch", "torchao", "onnx", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": names[0] if names else platform.processor(), "logical_cpus": os.cpu_count(),
            "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")},
            "quantcli_target_cpu": detect_cpu(), "threads": THREADS, "python": platform.python_version(),
            "versions": versions}


# ---------------------------------------------------------------- report

def table(rows: list[dict]) -> str:
    head = f"{'model':22} {'batch':>5} {'fp32 ms':>9} {'ORT flow':20} {'ORT ms':>9} {'quantcli ms':>11} {'q/ORT':>6} {'vs fp32':>7}"
    lines = [head]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['model']:22} {row['error']}")
            continue
        for batch in (1, 32):
            b = row[f"batch_{batch}"]
            for flow in row["ort_flows"]:
                lines.append(f"{row['model']:22} {batch:>5} {b['ms']['fp32']:>9.3f} {flow:20} {b['ms'][flow]:>9.3f} "
                             f"{b['ms']['quantcli']:>11.3f} {b['ratio_vs'][flow]:>6.3f} {b['speedup_vs_fp32']['quantcli']:>6.2f}x")
    lines += ["", f"{'model':22} {'int8 model':20} {'cos mean':>9} {'cos worst':>9} {'std-cos mean':>12} "
                  f"{'std-cos worst':>13} {'input-dep':>9}"]
    for row in rows:
        figures = dict(row.get("fidelity", {}))
        share = figures.pop("fp32_input_dependent_share", float("nan"))
        for name, f in figures.items():
            lines.append(f"{row['model']:22} {name:20} {f['cos_mean']:>9.4f} {f['cos_worst']:>9.4f} "
                         f"{f['std_cos_mean']:>12.4f} {f['std_cos_worst']:>13.4f} {share:>9.2%}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="extra recipe files (benchmarked like the CNNs)")
    parser.add_argument("--models", default=",".join([*VISION, ENCODER]),
                        help=f"comma-separated, from: {', '.join([*VISION, ENCODER])}; '' for none")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="keep every model file here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="time the models already built under --work")
    parser.add_argument("--build", help=argparse.SUPPRESS)  # child-process entry
    args = parser.parse_args()
    if args.build:
        build(args.build, args.work)
        return 0
    models = [m for m in args.models.split(",") if m] + [str(Path(r).resolve()) for r in args.recipes]
    unknown = [m for m in models if m not in (*VISION, ENCODER) and not Path(m).is_file()]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join([*VISION, ENCODER])}")
    if args.reuse and not args.work:
        parser.error("--reuse needs --work")
    with tempfile.TemporaryDirectory(prefix="quantcli-bench-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        rows = []
        for i, model in enumerate(models):
            out = work / slug(model)
            reused = args.reuse and (out / "build.json").is_file()
            print(f"[{i + 1}/{len(models)}] {model}: {'reusing ' + str(out) if reused else 'building'}",
                  file=sys.stderr, flush=True)
            info = json.loads((out / "build.json").read_text()) if reused else build_in_child(model, out)
            rows.append(info if "error" in info else measure(info, args.rounds))
    report = {"machine": machine(), "rounds": args.rounds, "models": rows}
    print(f"{report['machine']['cpu']}, {THREADS} threads, {args.rounds} rounds; ORT "
          f"{report['machine']['versions']['onnxruntime']}, torch {report['machine']['versions']['torch']}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
