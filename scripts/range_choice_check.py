"""Does `observer: auto` keep the activation range rule that fresh inputs prefer?

For each named sweep architecture and target (scripts/sweep.py's recipe and inputs: 32 calibration samples in
batches of 8), one process: `quantcli capture` and `quantcli prepare` as the sweep runs them, then calibrate's own
session in the process (quantcli.quantizers.range_choice), which judges the two rules on the held-out calibration
batches as calibrate does (in-sample: those batches are in both rules' ranges) and, for comparison, with the first
batch's ranges alone (out of sample: ranges the held-out batches did not shape). Each rule's model, its biases
corrected as calibrate corrects them, is scored on fresh inputs as the sweep scores them (the first output's SQNR
against fp32, of the part that varies with the input where there is one), in PyTorch with the convert's
arithmetic (quantizers.bias_correction.fake_quant). One JSON line per build in OUT/results.jsonl; a rerun skips
the builds there; the summary counts the builds where each way of choosing keeps the rule the fresh inputs
prefer, and its mean loss to that rule (dB).

    python scripts/range_choice_check.py --out judge-out timm:fbnetc_100 timm:mnasnet_small   # both targets
    python scripts/range_choice_check.py --out judge-out timm:resnet18 --targets avx2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402

WAYS = ("in_sample", "out_of_sample", "histogram", "minmax")  # how a build's rule is chosen, in the summary


def judge_one(name: str, target: str, folder: Path, rows: int) -> dict:
    """One build in this process: the rule each judgement keeps and each rule's SQNR on `rows` fresh inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = sweep.write_inputs(name, folder, target)
    work = folder / "work"
    for stage, src, dst in (("capture", None, "captured"), ("prepare", "captured", "prepared")):
        if not (work / dst / "manifest.json").is_file():
            source = [str(work / src)] if src else []
            command = [sys.executable, "-m", "quantcli", stage, *source, "--recipe", str(recipe), "-o", str(work / dst)]
            subprocess.run([*command, "-q", "--force"], check=True, stdout=subprocess.DEVNULL)

    from quantcli import _torch  # first: it imports torch and torchao silenced

    torch = _torch.torch
    from bench import sqnr
    from torchao.quantization.pt2e.observer import ObserverBase

    from quantcli import artifacts
    from quantcli.quantizers import bias_correction, range_choice
    from quantcli.stages.base import restore_prepared

    archs = sweep.architectures()
    module = restore_prepared(artifacts.open_artifact(work / "prepared", ("prepared",), "calibrate"))
    keys = [spec["name"] for spec in archs.input_specs(name)]

    def batches(data: dict, count: int) -> list[tuple]:
        rows = [slice(i, i + 8) for i in range(0, count, 8)]
        return [tuple(torch.from_numpy(np.ascontiguousarray(data[k][r])) for k in keys) for r in rows]

    observers = [
        module.get_submodule(n.target)
        for n in module.graph.nodes
        if n.op == "call_module" and isinstance(module.get_submodule(n.target), ObserverBase)
    ]

    def states() -> list[dict]:
        return [{k: v.clone() for k, v in o.state_dict().items()} for o in observers]

    session = range_choice.Session(module, correct=True)
    first_batch: list[dict] = []
    with torch.no_grad():
        for index, args in enumerate(batches(archs.inputs(name, *sweep.CALIBRATION), sweep.CALIBRATION[0])):
            session.forward(index, args)
            if index == 0:
                first_batch = states()
    full = states()
    params = {n: module.get_parameter(n) for n in sorted(set(session.correction.layers.values()))}
    start = {n: p.detach().clone() for n, p in params.items()}

    def judge(states: list[dict]) -> dict:
        for obs, state in zip(observers, states):
            obs.load_state_dict(state)
        range_choice._restore(params, start)
        choice = range_choice.choose(module, session.observers, session.held, session._correct, sorted(params))
        return {"rule": choice["rule"], "sqnr_db": choice["sqnr_db"]}

    judged = {"out_of_sample": judge(first_batch), "in_sample": judge(full)}  # the full ranges stay loaded
    fresh = batches(archs.inputs(name, rows, sweep.HELD_OUT[1]), rows)

    def outputs(make) -> np.ndarray:
        with torch.no_grad(), bias_correction.observers_replaced(module, make):
            return np.concatenate([range_choice.float_outputs(module(*args))[0].double().numpy() for args in fresh])

    range_choice._restore(params, start)
    fp32 = outputs(lambda obs: torch.nn.Identity())
    figure = "raw_sqnr_db" if round(sweep.varying_share(fp32), 6) < sweep.INPUT_DEPENDENT else "sqnr_db"
    scores = {}
    for searched, rule in range_choice.RULES.items():
        for obs in session.observers:
            obs.searched.fill_(searched)
        range_choice._restore(params, start)
        make = range_choice._quantizers()
        session._correct(make)
        scores[rule] = sqnr(fp32, outputs(make))[figure]
    return {"name": name, "target": target, **judged, "fresh_sqnr_db": scores, "fresh_rows": rows, "figure": figure}


def summary(results: list[dict]) -> str:
    def kept(row: dict, way: str) -> str:
        return row[way]["rule"] if way in ("in_sample", "out_of_sample") else way

    lines = [f"{len(results)} builds; the rule fresh inputs prefer kept, and the mean loss to it (dB):"]
    for way in WAYS:
        loss = [max(r["fresh_sqnr_db"].values()) - r["fresh_sqnr_db"][kept(r, way)] for r in results]
        right = sum(x <= 0 for x in loss)
        lines.append(f"  {way:14} {right:3} of {len(results)}   {statistics.mean(loss):.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="source:name architectures of scripts/sweep.py")
    parser.add_argument("--out", type=Path, default=Path("judge-out"))
    parser.add_argument("--targets", nargs="+", default=["vnni", "avx2"], choices=("avx2", "avx512", "vnni"))
    parser.add_argument("--rows", type=int, default=256, help="fresh inputs each rule is scored on")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # the child: NAME TARGET
    args = parser.parse_args()
    results = args.out / "results.jsonl"
    if args.one:
        name, target = args.one
        row = judge_one(name, target, args.out / f"{target}-{sweep.slug(name)}", args.rows)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        return 0
    if not args.names:
        parser.error("name at least one architecture (`python scripts/sweep.py --list` prints them)")
    args.out.mkdir(parents=True, exist_ok=True)
    finished = map(json.loads, results.read_text().splitlines()) if results.is_file() else []
    done = {(r["name"], r["target"]) for r in finished}
    for name in args.names:
        for target in args.targets:
            if (name, target) in done:
                continue
            print(f"{name} ({target})", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--one", name, target, "--out", str(args.out)]
            command += ["--rows", str(args.rows)]
            if subprocess.run(command, env=sweep.child_env(name)).returncode != 0:
                print(f"{name} ({target}): failed", file=sys.stderr)
    print(summary([json.loads(line) for line in results.read_text().splitlines()]) if results.is_file() else "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
