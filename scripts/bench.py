"""Benchmark: ONNX Runtime latency and fidelity of quantcli's int8 model against ORT's own quantization flows.

Models (`--models`, default all): the zoo CNNs of configs/bench/vision.py at 224 px (torchvision
ResNet-18, MobileNetV2, MobileNetV3-Large, EfficientNet-B0, ShuffleNetV2 x1.0, RegNetX-400MF,
ConvNeXt-Tiny, timm tf_efficientnet_lite0) and `minilm`, the MiniLM-sized sentence encoder of
configs/bench/text.py; positional arguments add any other recipe (benchmarked like the CNNs).

scripts/bench_build.py builds each model in a process of its own (the CNNs with the zoo
PYTHONPATH torchvision/timm need): quantcli's int8 model, the fp32 ONNX from the same exporter,
and ORT's recommended flow on that fp32 ONNX after `quant_pre_process` (`quantize_static` for the
CNNs; `quantize_dynamic`, default and per-channel, for the encoder). This process then times
every session of a model (fp32, ORT flows, quantcli) interleaved, round after round, at batch 1
and 32 with 2 threads and spinning off, and reports medians, the ratio quantcli / ORT flow (below
1: quantcli faster) and the speed-up over fp32. Fidelity: cosine similarity of each int8 model's
outputs to fp32's on held-out inputs (photo crops; 256 token sequences), raw and on outputs
standardized per dimension with fp32's mean and std over those inputs (every dimension weighing
alike); each input's SQNR against fp32 (the worst and the 5th percentile), which sees an error's size
where a cosine sees only its direction; the SQNR over all inputs. The JSON also holds CPU times, the op counts
ORT runs after optimizing each model, the machine (CPU model, AVX2/AVX-512/VNNI flags) and the versions.

    python scripts/bench.py [--models resnet18,minilm] [--rounds 15] [--json out.json] [--markdown]
                            [--work DIR [--reuse]]
                            [--target-cpu avx2]
    python scripts/bench.py --quantize-time [--models tf_efficientnet_lite0] [--repeats 3] [--markdown]

`--quantize-time` times instead how long each CNN takes to quantize: `quantcli run` at default
settings against ORT's flow from the same PyTorch model and 64 calibration images, per stage, each
in fresh processes, alternating (scripts/bench_time.py).

A benchmark, not a test: it asserts nothing, and its numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import importlib.metadata
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
from bench_build import MODELS, VISION

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path(__file__).resolve().parent / "bench_build.py"
ZOO_PATH = [ROOT / "tests" / "zoo_site", ROOT / ".venv" / "zoo"]
THREADS = 2
ROUND_SECONDS = 0.25  # each session runs about this long per round (at least one run)


def slug(model: str) -> str:
    """A model's folder name: its bench name, or <folder>-<stem> of a recipe path."""
    return model if model in MODELS else f"{Path(model).parent.name}-{Path(model).stem}"


def uses_zoo(model: str) -> bool:
    """Whether a recipe's model comes from torchvision or timm (which need the zoo PYTHONPATH)."""
    import yaml

    path = Path(model)
    return path.is_file() and bool({"torchvision", "timm"} & set(yaml.safe_load(path.read_text())["model"]))


def build_in_child(model: str, out: Path, target_cpu: str) -> dict:
    """Run bench_build.py in a fresh process (zoo PYTHONPATH for vision models); its build.json or the error."""
    paths = [*ZOO_PATH] if model in VISION or uses_zoo(model) else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(map(str, [*paths, ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])),
    }
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "build.log", "w") as log:
        done = subprocess.run(
            [sys.executable, str(BUILD), model, str(out), target_cpu], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        tail = (out / "build.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"model": model, "error": f"build failed (exit {done.returncode}): {tail[0]}"}
    return json.loads((out / "build.json").read_text())


# ---------------------------------------------------------------- measure (this process)


def run_all(sess, batch: dict[str, np.ndarray]) -> np.ndarray:
    return sess.run(None, {i.name: batch[i.name] for i in sess.get_inputs()})[0]


def interleaved(
    sessions: dict, feed: dict, rounds: int, round_seconds: float = ROUND_SECONDS
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall ms per run of each session, timed round-robin so load drifts hit all alike, each
    session running about `round_seconds` a round; and the median CPU ms of this process per run
    (all threads), which waiting for a busy core does not inflate: a check on the wall-time ratios
    when the machine is shared."""
    warm = {}
    for name, sess in sessions.items():
        run_all(sess, feed)
        start = time.perf_counter()
        run_all(sess, feed)
        warm[name] = time.perf_counter() - start
    per_round = max(1, math.ceil(round_seconds / min(warm.values())))
    wall: dict[str, list[float]] = {name: [] for name in sessions}
    cpu: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, sess in sessions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                run_all(sess, feed)
            wall[name].append((time.perf_counter() - start) * 1000 / per_round)
            cpu[name].append((time.process_time() - start_cpu) * 1000 / per_round)
    return (
        {name: statistics.median(t) for name, t in wall.items()},
        {name: statistics.median(t) for name, t in cpu.items()},
    )


def cosines(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    return (reference * other).sum(1) / np.maximum(
        np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1), 1e-30
    )


def sqnr(fp32: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """SQNR against fp32 over all rows (dB): of the part that varies with the input (each output less its mean
    over the rows), and raw."""
    from quantcli.numerics.parity import sqnr_db

    return {
        "sqnr_db": round(sqnr_db(fp32 - fp32.mean(0), out - out.mean(0)), 2),
        "raw_sqnr_db": round(sqnr_db(fp32, out), 2),
    }


def row_sqnr(fp32: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Each row's SQNR against fp32 (dB, as `sqnr`'s): its error's size as well as its direction, where a cosine sees
    only the direction (an output that two dimensions dominate turns by an error across them, not by one along them)."""
    from quantcli.numerics.parity import sqnr_db

    return np.array([sqnr_db(reference, row) for reference, row in zip(fp32, out)])


def fidelity(sessions: dict, rows: dict[str, np.ndarray], batch: int = 32) -> dict[str, dict]:
    """Top-1 agreement with fp32 (argmax of the flattened output; for classifiers), cosine to fp32 per held-out row,
    raw and on outputs standardized per dimension with fp32's
    mean and std over the rows (every dimension weighs alike): mean and worst row; each row's SQNR (`row_sqnr`):
    the worst and the 5th percentile; the SQNR over all rows (`sqnr`).
    Also the share of fp32's output energy that varies with the input: near 0 (random-weight CNNs) the
    standardized figures compare quantization noise with noise and mean nothing."""
    n = len(next(iter(rows.values())))
    outs = {
        name: np.concatenate([run_all(s, {k: v[i : i + batch] for k, v in rows.items()}) for i in range(0, n, batch)])
        for name, s in sessions.items()
    }
    fp32 = outs.pop("fp32").reshape(n, -1).astype(np.float64)
    mean, std = fp32.mean(0), np.maximum(fp32.std(0), 1e-12)
    result = {"fp32_input_dependent_share": round(float(fp32.var(0).sum() / np.square(fp32).mean(0).sum()), 5)}
    for name, out in outs.items():
        out = out.reshape(n, -1)
        raw, standardized = cosines(fp32, out), cosines((fp32 - mean) / std, (out - mean) / std)
        per_row = row_sqnr(fp32, out)
        result[name] = {
            "top1_agreement": round(float((out.argmax(1) == fp32.argmax(1)).mean()), 5),
            "cos_mean": round(float(raw.mean()), 5),
            "cos_worst": round(float(raw.min()), 5),
            "std_cos_mean": round(float(standardized.mean()), 5),
            "std_cos_worst": round(float(standardized.min()), 5),
            "row_sqnr_worst_db": round(float(per_row.min()), 2),
            "row_sqnr_p5_db": round(float(np.percentile(per_row, 5)), 2),
            **sqnr(fp32, out.astype(np.float64)),
        }
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
        result[f"batch_{batch}"] = {
            "ms": {k: round(v, 3) for k, v in med.items()},
            "ratio_vs": {f: round(med["quantcli"] / med[f], 3) for f in info["ort_flows"]},
            "speedup_vs_fp32": {k: round(med["fp32"] / v, 3) for k, v in med.items() if k != "fp32"},
            "cpu_ms": {k: round(v, 3) for k, v in cpu.items()},
            "cpu_ratio_vs": {f: round(cpu["quantcli"] / cpu[f], 3) for f in info["ort_flows"]},
        }
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
    return {
        "cpu": names[0] if names else platform.processor(),
        "logical_cpus": os.cpu_count(),
        "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")},
        "quantcli_target_cpu": detect_cpu(),
        "threads": THREADS,
        "python": platform.python_version(),
        "versions": versions,
    }


# ---------------------------------------------------------------- report


def label(model: str) -> str:
    """A model's name in the table: its bench name, or a recipe path relative to the repository."""
    path = Path(model)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else model


def table(rows: list[dict]) -> str:
    head = (
        f"{'model':26} {'batch':>5} {'fp32 ms':>9} {'ORT flow':20} {'ORT ms':>9} {'quantcli ms':>11} "
        f"{'q/ORT':>6} {'vs fp32':>7}"
    )
    lines = [head]
    for row in rows:
        if "error" in row:
            lines.append(f"{label(row['model']):26} {row['error']}")
            continue
        for batch in (1, 32):
            b = row[f"batch_{batch}"]
            for flow in row["ort_flows"]:
                lines.append(
                    f"{label(row['model']):26} {batch:>5} {b['ms']['fp32']:>9.3f} {flow:20} {b['ms'][flow]:>9.3f} "
                    f"{b['ms']['quantcli']:>11.3f} {b['ratio_vs'][flow]:>6.3f} "
                    f"{b['speedup_vs_fp32']['quantcli']:>6.2f}x"
                )
    lines += [
        "",
        f"{'model':26} {'int8 model':20} {'cos mean':>9} {'cos worst':>9} {'std-cos mean':>12} "
        f"{'std-cos worst':>13} {'input-dep':>9} {'SQNR dB':>8} {'raw SQNR':>8} {'row worst':>9} {'row p5':>7}",
    ]
    for row in rows:
        figures = dict(row.get("fidelity", {}))
        share = figures.pop("fp32_input_dependent_share", float("nan"))
        for name, f in figures.items():
            lines.append(
                f"{label(row['model']):26} {name:20} {f['cos_mean']:>9.4f} {f['cos_worst']:>9.4f} "
                f"{f['std_cos_mean']:>12.4f} {f['std_cos_worst']:>13.4f} {share:>9.2%} "
                f"{f['sqnr_db']:>8.2f} {f['raw_sqnr_db']:>8.2f} {f['row_sqnr_worst_db']:>9.2f} "
                f"{f['row_sqnr_p5_db']:>7.2f}"
            )
    return "\n".join(lines)


def cpu_words(m: dict) -> str:
    flags = m["flags"]
    kind = (
        "AVX-512 VNNI"
        if flags["avx512_vnni"]
        else "AVX-VNNI"
        if flags["avx_vnni"]
        else "AVX-512, no VNNI"
        if flags["avx512f"]
        else "AVX2, no VNNI"
        if flags["avx2"]
        else "no AVX2"
    )
    return f"{m['cpu']} ({kind})"


def markdown(report: dict) -> str:
    """The tables of docs/performance.md: latency per model and batch, then fidelity where the output varies
    with the input."""
    m = report["machine"]
    lines = [
        f"Medians of {report['rounds']} interleaved rounds in one run on {cpu_words(m)}, {m['threads']} threads, "
        f"models built for target_cpu {report.get('target_cpu', 'auto')} (timings mean something only on "
        "that CPU class), "
        f"ONNX Runtime {m['versions']['onnxruntime']}, torch {m['versions']['torch']}.",
        "",
        "| model | batch | fp32 ms | ORT flow | ORT ms | quantcli ms | quantcli / ORT | speed-up vs fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [r for r in report["models"] if "error" not in r]
    for row in rows:
        for batch in (1, 32):
            b = row[f"batch_{batch}"]
            for flow in row["ort_flows"]:
                lines.append(
                    f"| {label(row['model'])} | {batch} | {b['ms']['fp32']:.4g} | `{flow}` | {b['ms'][flow]:.4g} | "
                    f"{b['ms']['quantcli']:.4g} | {b['ratio_vs'][flow]:.3f} | {b['speedup_vs_fp32']['quantcli']:.2f}x |"
                )
    lines += [
        "",
        "| model | int8 model | cosine to fp32, mean | worst | standardized cosine, mean | worst "
        "| SQNR per row, worst | 5th percentile |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        figures = {k: v for k, v in row["fidelity"].items() if k != "fp32_input_dependent_share"}
        if row["fidelity"]["fp32_input_dependent_share"] < 0.05:
            continue  # a random-weight CNN's output hardly depends on its input
        for name, f in figures.items():
            lines.append(
                f"| {label(row['model'])} | {name} | {f['cos_mean']:.4f} | {f['cos_worst']:.4f} | "
                f"{f['std_cos_mean']:.4f} | {f['std_cos_worst']:.4f} | {f['row_sqnr_worst_db']:.2f} | "
                f"{f['row_sqnr_p5_db']:.2f} |"
            )
    return "\n".join(lines)


def quantize_time(parser: argparse.ArgumentParser, args: argparse.Namespace, models: list[str]) -> int:
    """--quantize-time: both flows per CNN in fresh processes (scripts/bench_time.py), a table, the JSON."""
    import bench_time

    others = [m for m in models if m not in VISION]
    if others:
        parser.error(f"--quantize-time times the CNNs ({', '.join(VISION)}), not {', '.join(others)}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*ZOO_PATH, ROOT]))}
    with tempfile.TemporaryDirectory(prefix="quantcli-bench-time-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        rows = [bench_time.compare(m, work / slug(m), args.target_cpu, args.repeats, env) for m in models]
    report = {"machine": machine(), "quantize_time": rows}
    print(f"{cpu_words(report['machine'])}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(bench_time.table(rows))
    if args.markdown:
        print("\n" + bench_time.markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="extra recipe files (benchmarked like the CNNs)")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, from: {', '.join(MODELS)}; '' for none"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work", type=Path, help="keep every model file here (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="time the models already built under --work")
    parser.add_argument(
        "--markdown", action="store_true", help="also print the tables of docs/performance.md in Markdown"
    )
    parser.add_argument(
        "--target-cpu",
        default="auto",
        choices=("auto", "avx2", "avx512", "vnni"),
        help="the CPU class quantcli's model (and quantize_static's reduce_range) is built for; "
        "any target builds anywhere, its latency means something only on that CPU",
    )
    parser.add_argument(
        "--quantize-time",
        action="store_true",
        help="instead of latency: time `quantcli run` against ORT's flow from the same PyTorch model, per stage "
        "(the CNNs; scripts/bench_time.py)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="--quantize-time: runs of each flow, alternating")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m] + [str(Path(r).resolve()) for r in args.recipes]
    unknown = [m for m in models if m not in MODELS and not Path(m).is_file()]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    if args.quantize_time:
        return quantize_time(parser, args, models)
    if args.reuse and not args.work:
        parser.error("--reuse needs --work")
    with tempfile.TemporaryDirectory(prefix="quantcli-bench-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        rows = []
        for i, model in enumerate(models):
            out = work / slug(model)
            reused = args.reuse and (out / "build.json").is_file()
            print(
                f"[{i + 1}/{len(models)}] {model}: {'reusing ' + str(out) if reused else 'building'}",
                file=sys.stderr,
                flush=True,
            )
            info = (
                json.loads((out / "build.json").read_text()) if reused else build_in_child(model, out, args.target_cpu)
            )
            rows.append(info if "error" in info else measure(info, args.rounds))
    report = {"machine": machine(), "rounds": args.rounds, "target_cpu": args.target_cpu, "models": rows}
    print(
        f"{report['machine']['cpu']}, {THREADS} threads, {args.rounds} rounds; ORT "
        f"{report['machine']['versions']['onnxruntime']}, torch {report['machine']['versions']['torch']}"
    )
    print(table(rows))
    if args.markdown:
        print("\n" + markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
