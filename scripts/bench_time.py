"""Time to quantize: `quantcli run` at default settings against ONNX Runtime's flow from the same PyTorch model.

`scripts/bench.py --quantize-time` runs this for each CNN: both flows start from the model's factory
and 64 calibration images (the bench's photo crops, seed 0, in an .npz; default batch size 32),
each flow in a fresh process as a CI job would run it, imports included, alternating quantcli and
ORT `--repeats` times so that a change in the machine's load hits both:

  - quantcli: `python -m quantcli run --recipe R -o W --force`, every stage's seconds from its
    output (timings.json, the export report);
  - ORT: build the model, `torch.onnx.export(dynamo=True)` with the same dynamic batch, opset 18,
    `quant_pre_process`, `quantize_static` (QDQ, per channel, uint8 activations, int8 weights,
    reduce_range where the target saturates: scripts/bench_build.py's flow), each step timed.

For each process: wall seconds, CPU seconds (all its threads, from the parent's rusage: a shared
machine inflates wall time, less so CPU time) and the steps; "start-up" is the wall time no step
accounts for (the interpreter, imports). The result is the median of each figure over the repeats.

    python scripts/bench_time.py ort RECIPE OUT   # ORT's flow in this process; OUT/ort_times.json
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from bench_build import BENCH, pre_process, static_flow

SAMPLES = 64  # calibration images (docs/performance.md, "Time to quantize")
QUANTCLI_STAGES = ("captured", "prepared", "calibrated", "converted", "exported")
ORT_STEPS = ("build", "onnx_export", "pre_process", "quantize_static")


def write_recipe(model: str, out: Path, target_cpu: str) -> Path:
    """A default recipe for the bench CNN `model`, calibrated on SAMPLES photo crops in an .npz."""
    import numpy as np

    from quantcli.loading.factory import load_callable

    out.mkdir(parents=True, exist_ok=True)
    photos = load_callable(f"{BENCH / 'vision.py'}:photos", "bench")
    np.savez(out / "calibration.npz", x=photos(SAMPLES, seed=0))
    recipe = yaml.safe_load((BENCH / "vision.yaml").read_text())
    recipe["model"] = {"factory": f"{BENCH / 'vision.py'}:build", "kwargs": {"name": model}}
    recipe["calibration"] = {"data": str(out / "calibration.npz")}
    recipe["quantization"] = {"target": "onnxruntime", "target_cpu": target_cpu}
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---------------------------------------------------------------- ORT's flow (a process of its own)


def ort_flow(recipe_path: Path, out: Path) -> dict[str, float]:
    """The model built from the recipe, exported to ONNX, pre-processed and quantized; seconds per step."""
    import torch

    from quantcli import quantizers
    from quantcli.loading.data import to_tensors
    from quantcli.loading.inputs import dynamic_shapes, export_example
    from quantcli.recipe import load
    from quantcli.sources.build import build_model

    seconds, start = {}, time.perf_counter()
    recipe = load(recipe_path)
    recipe = recipe.model_copy(update={"quantization": quantizers.resolve(recipe.quantization)})
    model = build_model(recipe).module
    seconds["build"], start = time.perf_counter() - start, time.perf_counter()
    args = to_tensors(export_example(recipe.inputs), recipe.inputs)
    fp32 = out / "fp32.onnx"
    torch.onnx.export(
        model,
        args,
        str(fp32),
        dynamo=True,
        dynamic_shapes=dynamic_shapes(recipe.inputs),
        input_names=[i.name for i in recipe.inputs],
        output_names=recipe.outputs,
        opset_version=18,
        external_data=False,
        verbose=False,
    )
    seconds["onnx_export"], start = time.perf_counter() - start, time.perf_counter()
    pre, _ = pre_process(fp32, out / "fp32.pre.onnx")
    seconds["pre_process"], start = time.perf_counter() - start, time.perf_counter()
    static_flow(pre, recipe.model_dump(mode="json"), out)
    seconds["quantize_static"] = time.perf_counter() - start
    return seconds


# ---------------------------------------------------------------- the driver


def timed(command: list[str], env: dict[str, str], log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, CPU seconds of the process and its children) of `command`."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return rc, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def quantcli_once(recipe: Path, work: Path, env: dict[str, str]) -> dict:
    work.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "quantcli", "run", "--recipe", str(recipe), "-o", str(work), "--force", "-q"]
    rc, wall, cpu = timed(command, env, work.parent / "quantcli.log")
    if rc != 0:
        return {"error": f"quantcli run exit {rc} (see {work.parent / 'quantcli.log'})"}
    steps = {s: json.loads((work / s / "timings.json").read_text())["seconds"] for s in QUANTCLI_STAGES[:-1]}
    steps["exported"] = json.loads((work / "model.report.json").read_text())["seconds"]
    return {"wall": wall, "cpu": cpu, "steps": steps}


def ort_once(recipe: Path, out: Path, env: dict[str, str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rc, wall, cpu = timed([sys.executable, __file__, "ort", str(recipe), str(out)], env, out / "ort.log")
    if rc != 0:
        return {"error": f"ORT flow exit {rc} (see {out / 'ort.log'})"}
    return {"wall": wall, "cpu": cpu, "steps": json.loads((out / "ort_times.json").read_text())}


def summary(runs: list[dict], steps: tuple[str, ...]) -> dict:
    """Medians over the runs: wall, CPU, each step, and the start-up (wall no step accounts for)."""
    median = statistics.median
    result = {
        "wall": round(median(r["wall"] for r in runs), 2),
        "cpu": round(median(r["cpu"] for r in runs), 2),
        "steps": {s: round(median(r["steps"][s] for r in runs), 2) for s in steps},
        "startup": round(median(r["wall"] - sum(r["steps"].values()) for r in runs), 2),
        "walls": [round(r["wall"], 1) for r in runs],
    }
    return result


def compare(model: str, out: Path, target_cpu: str, repeats: int, env: dict[str, str]) -> dict:
    """Both flows `repeats` times, alternating; medians, and quantcli's over ORT's."""
    recipe = write_recipe(model, out, target_cpu)
    quantcli_runs, ort_runs = [], []
    for i in range(repeats):
        for name, runs, once in (("quantcli", quantcli_runs, quantcli_once), ("ort", ort_runs, ort_once)):
            print(f"  {model} {name} run {i + 1}/{repeats}", file=sys.stderr, flush=True)
            result = once(recipe, out / name / ("work" if name == "quantcli" else ""), env)
            if "error" in result:
                return {"model": model, "error": result["error"]}
            runs.append(result)
    q, o = summary(quantcli_runs, QUANTCLI_STAGES), summary(ort_runs, ORT_STEPS)
    return {
        "model": model,
        "samples": SAMPLES,
        "repeats": repeats,
        "quantcli": q,
        "ort": o,
        "ratio_wall": round(q["wall"] / o["wall"], 2),
        "ratio_cpu": round(q["cpu"] / o["cpu"], 2),
        "threads": env.get("OMP_NUM_THREADS", "default"),
    }


def table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        if "error" in row:
            lines.append(f"{row['model']}: {row['error']}")
            continue
        q, o = row["quantcli"], row["ort"]
        lines += [
            f"{row['model']}: {row['samples']} calibration images, median of {row['repeats']} alternating runs",
            f"  quantcli run  wall {q['wall']:6.1f} s  CPU {q['cpu']:6.1f} s  start-up {q['startup']:.1f}  "
            + "  ".join(f"{s} {v:.1f}" for s, v in q["steps"].items()),
            f"  ORT flow      wall {o['wall']:6.1f} s  CPU {o['cpu']:6.1f} s  start-up {o['startup']:.1f}  "
            + "  ".join(f"{s} {v:.1f}" for s, v in o["steps"].items()),
            f"  quantcli / ORT: wall {row['ratio_wall']:.2f}x, CPU {row['ratio_cpu']:.2f}x",
        ]
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """docs/performance.md's table: seconds per stage of both flows, medians."""
    lines = [
        "| model | flow | start-up | stages (s) | wall s | CPU s | quantcli / ORT, wall (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "error" in row:
            continue
        for name in ("quantcli", "ort"):
            f = row[name]
            stages = ", ".join(f"{s} {v:.1f}" for s, v in f["steps"].items())
            ratio = f"{row['ratio_wall']:.2f}x ({row['ratio_cpu']:.2f}x)" if name == "quantcli" else ""
            flow = "`quantcli run`" if name == "quantcli" else "ORT: export, `quant_pre_process`, `quantize_static`"
            figures = f"{f['startup']:.1f} | {stages} | {f['wall']:.1f} | {f['cpu']:.1f}"
            lines.append(f"| {row['model']} | {flow} | {figures} | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] != "ort":
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" advice
    out = Path(sys.argv[3])
    seconds = ort_flow(Path(sys.argv[2]), out)
    (out / "ort_times.json").write_text(json.dumps(seconds, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
