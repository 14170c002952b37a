"""Sweep: quantcli at default settings against ONNX Runtime's own quantizer on many public architectures.

Architectures (positional `source:name`, default all): configs/bench/architectures.py's list of timm,
torchvision and transformers models (small inputs, seeded random weights with realistic
normalisation statistics). Each one runs in a process of its own (a crash is one row), with the zoo
PYTHONPATH for timm/torchvision (tests/zoo_site), and writes OUT/<source>-<name>/result.json; a
rerun skips the architectures that have one (`--redo` runs them again), so a sweep can be stopped
and resumed, or run in chunks.

In that process: the calibration (32 samples) and held-out (32) inputs as .npz, a default recipe,
`quantcli run` as a subprocess (its exit code and time); quantcli's fp32 program through the same
exporter, ORT's `quant_pre_process` and `quantize_static` (QDQ, per channel, uint8 activations,
int8 weights, reduce_range where the target's u8 x s8 kernels saturate, the same calibration
samples; scripts/bench_build.py) and for transformers `quantize_dynamic` (per tensor, and per
channel). Then, per model file: integer vs float convs/matmuls and the float ops between
DequantizeLinear and QuantizeLinear in ORT's optimized graph (every op on such a path, by type:
quantcli.onnx.islands; `avoidable`: those not of the kinds quantcli.onnx.islands.ALLOWED keeps
float; apart, the ops on such paths that start at an integer kernel's float output, a QGemm without
an output scale or MatMulIntegerToFloat, which the first count does not see), SQNR against fp32 on
the held-out inputs (of the output less its mean over the inputs: what depends on the input, as
random-weight CNNs' outputs hardly do; where that part holds under 0.1 % of the output's energy, of
the raw output; scored with ORT's graph optimizations off, "unfused", where `--target-cpu` names a target
whose u8 x s8 kernels do not saturate and this machine's do: the target's products, not this CPU's
saturated ones), latency at batch 1 and 32 (one thread, sessions interleaved
round after round, medians: scripts/bench.py; of a target other than this machine's, meaningless) and
file size. A flow of ORT's that raises is recorded
as failed and the rest still measured.

    python scripts/sweep.py [NAME ...] [--out sweep-out] [--redo] [--rounds 7] [--markdown]
                            [--target-cpu auto] [--timeout 1200] [--keep] [--list]
                            [--seed 0] [--observer NAME]     # a variant: other weights, another observer
    python scripts/sweep.py --retime --rounds 15 [NAME ...]   # time finished ones again (a quiet machine)
    python scripts/sweep.py --recount [NAME ...]              # count their ops again from the kept files
    python scripts/sweep.py --rescore 256 [NAME ...]          # their SQNR again, on more held-out inputs
    python scripts/sweep.py --report --markdown [NAME ...]    # run nothing: the tables of what is there

The output: one row per architecture, a table per group (timm, torchvision, transformers encoders,
decoders, vision and audio towers) and a summary line, over the named architectures that have
results, headed by the machine of the last run (OUT/machine.json). A benchmark, not a test: it
asserts nothing, and its timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES_FILE = ROOT / "configs" / "bench" / "architectures.py"
ZOO_PATH = [ROOT / "tests" / "zoo_site", ROOT / ".venv" / "zoo"]
CALIBRATION, HELD_OUT = (32, 100), (32, 7)  # (samples, seed)
THREADS = 1  # a shared machine: one thread per session times more steadily
ROUND_SECONDS = 0.1
TOLERANCE = 1.03  # "within ORT's latency": at most this ratio
SQNR_MARGIN_DB = 0.5  # "a lower SQNR": lower than ORT's by more than this
INPUT_DEPENDENT = 1e-3  # below this share of the output's energy the input-dependent SQNR is noise: raw instead
RESULT = "result.json"


def architectures():
    """configs/bench/architectures.py as a module (numpy only at import)."""
    name = "quantcli_bench_architectures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ARCHITECTURES_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def slug(name: str) -> str:
    return name.replace(":", "-")


# ---------------------------------------------------------------- one architecture (its own process)
def write_inputs(name: str, out: Path, target_cpu: str, seed: int = 0, observer: str | None = None) -> Path:
    """The calibration and held-out .npz and a default recipe for `name` in `out`; the recipe's path. A variant:
    `seed` draws other weights (the data stay), `observer` names quantcli's activation observer."""
    import yaml

    archs = architectures()
    np.savez(out / "calibration.npz", **archs.inputs(name, *CALIBRATION))
    np.savez(out / "held_out.npz", **archs.inputs(name, *HELD_OUT))
    recipe = {
        "model": {
            "factory": f"{ARCHITECTURES_FILE}:build",
            "kwargs": {"name": name, **({"seed": seed} if seed else {})},
        },
        "inputs": archs.input_specs(name),
        "calibration": {"data": str(out / "calibration.npz"), "batch_size": 8},
    }
    quantization = {"target_cpu": target_cpu} if target_cpu != "auto" else {}
    if observer:
        quantization["observer"] = observer
    if quantization:
        recipe["quantization"] = quantization
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def quantcli_run(recipe: Path, work: Path) -> dict:
    """`quantcli run` as a user runs it: exit code, wall seconds, each stage's seconds, the error line."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "quantcli", "run", "--recipe", str(recipe), "-o", str(work), "--force", "-q"],
        capture_output=True,
        text=True,
    )
    stages = {}
    for stage in ("captured", "prepared", "calibrated", "converted"):
        timings = work / stage / "timings.json"
        if timings.is_file():
            stages[stage] = json.loads(timings.read_text())["seconds"]
    if (work / "model.report.json").is_file():
        stages["exported"] = json.loads((work / "model.report.json").read_text())["seconds"]
    lines = done.stderr.strip().splitlines()
    calibrated = work / "calibrated" / "manifest.json"
    ranges = json.loads(calibrated.read_text()).get("ranges", {}) if calibrated.is_file() else {}
    return {
        "rc": done.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "stages": stages,
        "ranges": ranges.get("rule", ""),  # observer: auto's choice (quantcli.quantizers.range_choice)
        "error": lines[-1][:300] if done.returncode and lines else "",
    }


def ort_flows(name: str, work: Path, out: Path) -> tuple[dict[str, Path], dict]:
    """fp32.onnx from quantcli's captured program, ORT's pre-processing and flows; paths, seconds, and
    the flows that failed (ORT's quantizer raises on some graphs: a finding, not the sweep's end)."""
    from bench_build import dynamic_flows, fp32_onnx, pre_process, static_flow

    seconds, start = {}, time.perf_counter()
    fp32, recipe = fp32_onnx(work, out / "fp32.onnx")
    seconds["fp32_export"] = time.perf_counter() - start
    start = time.perf_counter()
    pre, note = pre_process(fp32, out / "fp32.pre.onnx")
    seconds["pre_process"] = time.perf_counter() - start
    files, failed = {"fp32": fp32}, {}
    flows = {"quantize_static": static_flow}
    if architectures().source(name) == "transformers":
        flows["quantize_dynamic"] = dynamic_flows
    for flow, make in flows.items():
        start = time.perf_counter()
        try:
            files.update(make(pre, recipe, out))
        except Exception as exc:
            failed[flow] = first_line(exc)
        seconds[flow] = time.perf_counter() - start
    info = {"seconds": {k: round(v, 1) for k, v in seconds.items()}, "pre_process": note}
    return files, {**info, "failed": failed} if failed else info


def first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def file_mb(path: Path) -> float:
    """The model's size with its external data, if any, in MB."""
    data = path.with_name(path.name + ".data")
    return round((path.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 1e6, 3)


def graph_counts(path: Path) -> dict:
    """Integer/float convs and matmuls, and the float ops between DQ and Q (all, by type, avoidable)."""
    from quantcli.onnx.fusion import analyze, optimized_graph
    from quantcli.onnx.islands import island_nodes

    analysis, optimized = analyze(path), optimized_graph(path)
    counted = island_nodes(optimized)
    floats = Counter(n.op_type for n in counted)
    # float ops whose path starts at an integer kernel's float output (QGemm without an output scale, ...)
    after = Counter(n.op_type for n in island_nodes(optimized, from_float_kernels=True)) - floats
    avoidable = [i for i in analysis["islands"] if not i["allowed"]]
    return {
        "integer": analysis["coverage"]["integer"],
        "total": analysis["coverage"]["total"],
        "float_ops": sum(floats.values()),
        "float_ops_by_type": dict(floats.most_common()),
        "float_ops_after_kernels": sum(after.values()),
        "float_ops_after_kernels_by_type": dict(after.most_common()),
        "avoidable": len(avoidable),
        "avoidable_by_type": dict(Counter(i["op_type"] for i in avoidable).most_common()),
        "avoidable_modules": dict(Counter(i["module_type"] or "?" for i in avoidable).most_common(8)),
        "avoidable_torch_ops": dict(Counter(i["torch_op"] or "?" for i in avoidable).most_common(8)),
    }


def exact_arithmetic(out: Path) -> bool:
    """Whether this machine must score `out`'s models with ORT's graph optimizations off: their target's u8 x s8
    kernels do not saturate (8-bit weights, ORT's flow without reduce_range) and this CPU's do, where the fused
    kernels would saturate what the target computes exactly. Unfused, ORT dequantizes and runs the float op: the
    products a VNNI machine computes, requantized in float (tests/peer.py does the same). Latency on such a
    machine means nothing."""
    import yaml

    from quantcli.quantizers.cpu import detect_cpu, saturates_only_here

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    target = (recipe.get("quantization") or {}).get("target_cpu", "auto")
    return target != "auto" and saturates_only_here(target, detect_cpu())


def varying_share(fp32: np.ndarray) -> float:
    """The share of fp32's output energy that varies with the input (each output less its mean over the rows)."""
    centered = fp32 - fp32.mean(0)
    return float(np.square(centered).sum() / max(np.square(fp32).sum(), 1e-30))


def fidelity(sessions: dict, rows: dict[str, np.ndarray]) -> dict:
    """SQNR of each int8 model against fp32 on `rows` (bench.sqnr); the share of fp32's output that varies."""
    from bench import run_all, sqnr

    n = len(next(iter(rows.values())))
    outs = {
        name: np.concatenate([run_all(s, {k: v[i : i + 8] for k, v in rows.items()}) for i in range(0, n, 8)])
        for name, s in sessions.items()
    }
    fp32 = outs.pop("fp32").astype(np.float64)
    result = {"share": round(varying_share(fp32), 6)}
    for name, out in outs.items():
        result[name] = sqnr(fp32, out)
    return result


def latency(sessions: dict, rows: dict[str, np.ndarray], rounds: int) -> dict:
    """Median ms per run at batch 1 and 32, the sessions interleaved (scripts/bench.py)."""
    from bench import interleaved

    result = {}
    for batch in (1, 32):
        feed = {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:]))) for k, v in rows.items()}
        wall, _ = interleaved(sessions, feed, rounds, ROUND_SECONDS)
        result[str(batch)] = {k: round(v, 3) for k, v in wall.items()}
    return result


def sweep_one(name: str, out: Path, args: argparse.Namespace) -> dict:
    """Everything the sweep records of one architecture (scripts/sweep.py's docstring)."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" advice
    arch, start = architectures().ARCHITECTURES[name], time.perf_counter()
    work = out / "quantcli"
    result = {"name": name, "kind": arch.kind, "size": arch.size, "note": arch.note}
    if args.seed or args.observer:
        result["variant"] = {"seed": args.seed, "observer": args.observer}
    result["quantcli"] = quantcli_run(write_inputs(name, out, args.target_cpu, args.seed, args.observer), work)
    if not (work / "converted" / "float.pt2").is_file():
        return {**result, "error": f"quantcli exit {result['quantcli']['rc']}: {result['quantcli']['error']}"}
    try:
        files, result["ort"] = ort_flows(name, work, out)
    except Exception as exc:  # no fp32 ONNX that ORT loads (BEiT's): nothing of ORT's, no reference to measure
        files, result["ort"] = {}, {"seconds": {}, "failed": {"fp32": first_line(exc)}}
    if (work / "model.onnx").is_file():
        files["quantcli"] = work / "model.onnx"
    if not args.keep:  # the stages' programs: hundreds of MB on the larger models
        for stage in ("captured", "prepared", "calibrated", "converted"):
            shutil.rmtree(work / stage, ignore_errors=True)
        (out / "fp32.pre.onnx").unlink(missing_ok=True)
    from quantcli.onnx import runtime

    sessions = {k: runtime.session(p, threads=THREADS) for k, p in files.items()}
    rows = dict(np.load(out / "held_out.npz"))
    result["mb"] = {k: file_mb(p) for k, p in files.items()}
    result["ops"] = {k: graph_counts(p) for k, p in files.items() if k != "fp32"}
    if "fp32" in files:
        exact = exact_arithmetic(out)
        scored = {k: runtime.session(p, threads=THREADS, optimize=False) for k, p in files.items()} if exact else None
        result["fidelity"] = {**fidelity(scored or sessions, rows), **({"unfused": True} if exact else {})}
        result["ms"] = latency(sessions, rows, args.rounds)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def kept_files(out: Path, flows) -> dict[str, Path]:
    """The model file sweep_one kept of each flow named (quantcli, fp32, quantize_static, ...)."""
    return {k: out / "quantcli" / "model.onnx" if k == "quantcli" else out / f"{k}.onnx" for k in flows}


def kept_sessions(out: Path, result: dict, optimize: bool = True) -> dict:
    """ORT sessions of the model files a finished architecture kept, by flow."""
    from quantcli.onnx import runtime

    return {k: runtime.session(p, threads=THREADS, optimize=optimize) for k, p in kept_files(out, result["mb"]).items()}


def recount(out: Path) -> None:
    """Count a finished architecture's kernels and float ops again from its kept files, into its result.json:
    for a change of what is counted, without running the flows again."""
    result = json.loads((out / RESULT).read_text())
    result["ops"] = {k: graph_counts(p) for k, p in kept_files(out, result["ops"]).items()}
    (out / RESULT).write_text(json.dumps(result, indent=1) + "\n")


def retime(out: Path, rounds: int) -> None:
    """Time a finished architecture's models again (batch 1 and 32), into its result.json: a second look
    at a latency ratio measured while the machine was busy."""
    result = json.loads((out / RESULT).read_text())
    sessions = kept_sessions(out, result)
    result["ms"] = latency(sessions, dict(np.load(out / "held_out.npz")), rounds)
    result["retimed_rounds"] = rounds
    (out / RESULT).write_text(json.dumps(result, indent=1) + "\n")


def rescore(name: str, out: Path, rows: int) -> None:
    """Measure a finished architecture's SQNR again on `rows` held-out inputs (the same seed, so photo crops
    begin with the 32 it had), into its result.json: a gap of a few tenths of a dB on 32 inputs can be their
    sampling spread."""
    result = json.loads((out / RESULT).read_text())
    exact = exact_arithmetic(out)
    sessions = kept_sessions(out, result, optimize=not exact)
    result["fidelity"] = fidelity(sessions, architectures().inputs(name, rows, HELD_OUT[1]))
    result["fidelity"].update({"unfused": True} if exact else {})
    result["rescored_rows"] = rows
    (out / RESULT).write_text(json.dumps(result, indent=1) + "\n")


# ---------------------------------------------------------------- the driver
def child_env(name: str) -> dict[str, str]:
    """The environment of an architecture's own process: one thread, and timm's and torchvision's packages where it
    needs them (transformers' BertModel breaks beside that torchvision)."""
    zoo = [] if architectures().source(name) == "transformers" else ZOO_PATH
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(map(str, [*zoo, ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])),
    }


def run_child(name: str, out: Path, args: argparse.Namespace) -> None:
    """sweep_one in a fresh process; a crash or a timeout becomes the architecture's result."""
    env = child_env(name)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        name,
        "--out",
        str(out),
        "--rounds",
        str(args.rounds),
    ]
    command += ["--target-cpu", args.target_cpu, "--seed", str(args.seed)] + (["--keep"] if args.keep else [])
    command += ["--observer", args.observer] if args.observer else []
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT).unlink(missing_ok=True)
    start = time.perf_counter()
    with open(out / "sweep.log", "w") as log:
        try:
            rc = subprocess.run(  # in `out`: ORT's pre-processing leaves temporary files in the working folder
                command, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if not (out / RESULT).is_file():
        tail = (out / "sweep.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        error = {"name": name, "error": f"sweep process {'timed out' if rc == 'timeout' else f'exit {rc}'}: {tail[0]}"}
        (out / RESULT).write_text(json.dumps({**error, "seconds": round(time.perf_counter() - start, 1)}) + "\n")


def ratio(row: dict, batch: int, peer: str) -> float | None:
    ms = row.get("ms", {}).get(str(batch), {})
    return ms["quantcli"] / ms[peer] if "quantcli" in ms and peer in ms else None


def sqnr(row: dict, model: str) -> tuple[float, bool]:
    """A model's SQNR against fp32: of the input-dependent part where the output has one, else raw (True)."""
    raw = row.get("fidelity", {}).get("share", 1.0) < INPUT_DEPENDENT
    figures = row.get("fidelity", {}).get(model, {})
    return figures.get("raw_sqnr_db" if raw else "sqnr_db", math.nan), raw


def every_float_op(ops: dict) -> int:
    """The float ops between DQ and Q, those behind an integer kernel's float output included."""
    return ops["float_ops"] + ops.get("float_ops_after_kernels", 0)


def compared(row: dict) -> dict:
    """quantcli against quantize_static on one row where both made a model: what the summary counts."""
    q, s = row["ops"]["quantcli"], row["ops"]["quantize_static"]
    gain = sqnr(row, "quantcli")[0] - sqnr(row, "quantize_static")[0]  # nan where either is missing
    return {
        "fewer_integer": q["integer"] < s["integer"],
        "more_float_ops": every_float_op(q) > every_float_op(s),
        # beyond the ops kept float by design (islands.ALLOWED: norms, GELU, Softmax, and the residual stream past
        # a LayerNorm, which quantized took a ViT from 29.6 to 8.6 dB): what no rule explains
        "more_avoidable": q["avoidable"] > s["avoidable"],
        # more float ops that buy no accuracy: an SQNR not SQNR_MARGIN_DB over ORT's to show for them
        "unpaid": every_float_op(q) > every_float_op(s) and not gain >= SQNR_MARGIN_DB,
        "lower_sqnr": not gain >= -SQNR_MARGIN_DB,
        "slower": any((ratio(row, b, "quantize_static") or math.inf) > TOLERANCE for b in (1, 32)),
        "larger": row["mb"]["quantcli"] > row["mb"]["quantize_static"],
    }


# compared()'s, as tallied
COUNTS = ("fewer_integer", "more_float_ops", "unpaid", "more_avoidable", "lower_sqnr", "larger")


def quantize_seconds(row: dict) -> tuple[float, float]:
    """`quantcli run`'s wall time, and ORT's static flow's from quantcli's fp32 program (ONNX export,
    pre-processing, quantize_static): its capture is not counted."""
    ort = row["ort"]["seconds"]
    steps = ("fp32_export", "pre_process", "quantize_static")
    return row["quantcli"]["seconds"], sum(ort[k] for k in steps) if set(steps) <= set(ort) else math.nan


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def tally(rows: list[dict]) -> dict:
    """How many architectures exit 0, and how many fall short of quantize_static, and how (summary's figures)."""
    done = [r for r in rows if {"quantcli", "quantize_static"} <= set(r.get("ops", {}))]
    c = [compared(r) for r in done]
    return {
        "models": len(rows),
        "exit0": sum(r.get("quantcli", {}).get("rc") == 0 for r in rows),
        "ort_failed": sum(bool({"fp32", "quantize_static"} & set(r.get("ort", {}).get("failed", {}))) for r in rows),
        "compared": len(done),
        "within": sum(not x["slower"] for x in c),
        "b1": geomean([x for r in done if (x := ratio(r, 1, "quantize_static"))]),
        "b32": geomean([x for r in done if (x := ratio(r, 32, "quantize_static"))]),
        "dynamic": [geomean([x for r in done if (x := ratio(r, b, "quantize_dynamic"))]) for b in (1, 32)],
        **{key: sum(x[key] for x in c) for key in COUNTS},
        "seconds": geomean([q / o for q, o in map(quantize_seconds, done)]),
    }


def summary(rows: list[dict]) -> str:
    """One line: tally's figures in words."""
    t = tally(rows)
    return (
        f"{t['models']} models: {t['exit0']} exit 0 (ORT's static flow fails on {t['ort_failed']}), "
        f"{t['compared']} compared; against quantize_static: {t['within']} within {TOLERANCE}x its latency at "
        f"batch 1 and 32 (geometric mean {t['b1']:.3f}x / {t['b32']:.3f}x), {t['fewer_integer']} with fewer "
        f"integer convs/matmuls, {t['more_float_ops']} with more float ops between DQ and Q ({t['unpaid']} "
        f"without an SQNR {SQNR_MARGIN_DB} dB higher for them, {t['more_avoidable']} with more avoidable ones), "
        f"{t['lower_sqnr']} with "
        f"an SQNR over {SQNR_MARGIN_DB} dB lower, {t['larger']} with a larger file; "
        f"time to quantize {t['seconds']:.2f}x ORT's flow (geometric mean)"
    )


def group(name: str) -> str:
    """timm, torchvision, or transformers and what the model reads (encoder, decoder, vision, audio)."""
    kind = architectures().ARCHITECTURES[name].kind
    if architectures().source(name) != "transformers":
        return architectures().source(name)
    return "transformers " + {"pixels": "vision", "mels": "audio"}.get(kind, kind)


def groups_markdown(rows: list[dict]) -> str:
    """tally per group and over all rows, as a Markdown table."""
    head = ["group", "models", "exit 0", "compared", f"within {TOLERANCE}x latency", "latency b1/b32 (geomean)"]
    head += ["vs quantize_dynamic b1/b32"]
    head += ["fewer int kernels", "more float ops", "of those, no higher SQNR", "more avoidable", "lower SQNR"]
    head += ["larger file", "quantize time"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    groups = {g: [r for r in rows if group(r["name"]) == g] for g in dict.fromkeys(group(r["name"]) for r in rows)}
    for name, members in [*groups.items(), ("all", rows)]:
        t = tally(members)
        figures = [t[k] for k in ("models", "exit0", "compared", "within")] + [f"{t['b1']:.2f}/{t['b32']:.2f}"]
        figures += ["" if math.isnan(t["dynamic"][0]) else "{:.2f}/{:.2f}".format(*t["dynamic"])]
        figures += [t[k] for k in COUNTS]
        lines.append("| " + " | ".join(map(str, [name, *figures, f"{t['seconds']:.2f}x"])) + " |")
    return "\n".join(lines)


def after_kernels(q: dict, s: dict) -> str:
    """The float-ops cell's second count where any: the ops behind integer kernels' float outputs."""
    a, b = q.get("float_ops_after_kernels", 0), s.get("float_ops_after_kernels", 0)
    return f" (+{a}/+{b} after float-output kernels)" if a or b else ""


def cells(row: dict) -> list[str]:
    """A row of the table: exit, int kernels, float ops, SQNR, latency ratios, sizes, seconds."""
    rc = row.get("quantcli", {}).get("rc", "-")
    if "ops" not in row:
        return [row["name"], str(rc), row.get("error", "")[:90], *[""] * (len(HEADER) - 3)]
    q, s = row["ops"].get("quantcli", {}), row["ops"].get("quantize_static", {})
    (sq, raw), (ss, _) = sqnr(row, "quantcli"), sqnr(row, "quantize_static")

    def r(batch: int, peer: str) -> str:
        x = ratio(row, batch, peer)
        return "-" if x is None else f"{x:.2f}"

    dynamic = "quantize_dynamic" in row["ort"]["seconds"]
    flows = (
        ("quantcli", "quantize_static", "quantize_dynamic", "fp32")
        if dynamic
        else ("quantcli", "quantize_static", "fp32")
    )
    sizes = "/".join(f"{row['mb'][k]:.3g}" if k in row["mb"] else "-" for k in flows)
    return [
        row["name"],
        str(rc),
        f"{q.get('integer', '-')}/{s.get('integer', '-')} of {s.get('total', q.get('total', '-'))}",
        f"{q.get('float_ops', '-')}/{s.get('float_ops', '-')}" + after_kernels(q, s),
        "/".join("-" if math.isnan(x) else f"{x:.1f}" for x in (sq, ss))
        + (" raw" if raw else "")
        + (" unfused" if row.get("fidelity", {}).get("unfused") else "")
        + (" (min-max)" if row["quantcli"].get("ranges") == "minmax" else ""),
        f"{r(1, 'quantize_static')}/{r(32, 'quantize_static')}",
        f"{r(1, 'quantize_dynamic')}/{r(32, 'quantize_dynamic')}" if dynamic else "",
        sizes,
        "/".join("-" if math.isnan(t) else f"{t:.0f}" for t in quantize_seconds(row)),
    ]


HEADER = [
    "model",
    "exit",
    "int kernels q/ORT",
    "float ops q/ORT",
    "SQNR dB q/ORT",
    "latency q/static b1/b32",
    "q/dynamic b1/b32",
    "MB q/static/dynamic/fp32",
    "quantize s q/ORT",
]


def text_table(rows: list[dict]) -> str:
    """The rows in aligned columns; an error row's message runs on past its column."""
    table = [HEADER, *map(cells, rows)]
    measured = [r for r in table if r[3] or r is HEADER]
    widths = [max(len(r[i]) for r in measured) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        if r[3] or r is HEADER
        else "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2]])
        for r in table
    )


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in cells(r)) + " |" for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="source:name architectures (default: all of the list)")
    parser.add_argument("--out", type=Path, default=Path("sweep-out"), help="one folder per architecture")
    parser.add_argument("--redo", action="store_true", help="run the named architectures again")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per batch size")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds one architecture may take")
    parser.add_argument("--target-cpu", default="auto", choices=("auto", "avx2", "avx512", "vnni"))
    parser.add_argument("--keep", action="store_true", help="keep the stages' programs and ORT's pre-processed fp32")
    parser.add_argument("--seed", type=int, default=0, help="draw the weights from this seed (the data stay)")
    parser.add_argument("--observer", help="quantcli's activation observer instead of the default (a variant)")
    parser.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    parser.add_argument("--list", action="store_true", help="print the architectures and exit")
    parser.add_argument("--report", action="store_true", help="run nothing: the table of the results there are")
    parser.add_argument(
        "--retime", action="store_true", help="time the named finished architectures again (their files are kept)"
    )
    parser.add_argument(
        "--recount", action="store_true", help="count the named finished architectures' ops again (files kept)"
    )
    parser.add_argument(
        "--rescore", type=int, metavar="ROWS", help="measure the named finished architectures' SQNR on ROWS inputs"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: one architecture into --out
    args = parser.parse_args()
    known = architectures().ARCHITECTURES
    if args.list:
        print("\n".join(f"{name:45} {arch.note}" for name, arch in known.items()))
        return 0
    if args.one:
        result = sweep_one(args.one, args.out, args)
        (args.out / RESULT).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    names = args.names or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown architectures {unknown}; `--list` prints the known ones")
    if not args.report:  # the machine the figures come from (the last run's, when a sweep runs in chunks)
        from bench import machine

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "machine.json").write_text(json.dumps({**machine(), "threads": THREADS}, indent=1) + "\n")
    again = args.retime or args.recount or args.rescore  # finished architectures measured again, none run
    for i, name in enumerate(names):
        out = (args.out / slug(name)).resolve()
        done = (out / RESULT).is_file()
        finished = json.loads((out / RESULT).read_text()) if done and again else {}
        if args.retime and "ms" in finished:
            print(f"[{i + 1}/{len(names)}] {name}: timing again", file=sys.stderr, flush=True)
            retime(out, args.rounds)
        if args.recount and "ops" in finished:
            print(f"[{i + 1}/{len(names)}] {name}: counting again", file=sys.stderr, flush=True)
            recount(out)
        if args.rescore and "fidelity" in finished:
            print(f"[{i + 1}/{len(names)}] {name}: SQNR on {args.rescore} inputs", file=sys.stderr, flush=True)
            rescore(name, out, args.rescore)
        if args.report or again or (done and not args.redo):
            continue
        print(f"[{i + 1}/{len(names)}] {name}", file=sys.stderr, flush=True)
        run_child(name, out, args)
    rows = [json.loads(p.read_text()) for n in names if (p := args.out / slug(n) / RESULT).is_file()]
    if (args.out / "machine.json").is_file():
        from bench import cpu_words

        m = json.loads((args.out / "machine.json").read_text())
        versions = f"ORT {m['versions']['onnxruntime']}, torch {m['versions']['torch']}"
        print(f"{cpu_words(m)}, {m['logical_cpus']} logical CPUs, {m['threads']} thread a session; {versions}")
    print(markdown(rows) if args.markdown else text_table(rows))
    print(f"\n{groups_markdown(rows)}\n\n{summary(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
