"""Benchmark: ONNX Runtime kernels the export's rewrites choose between, each form alone on one input.

- `skip_norm`: Add -> LayerNormalization on two (32, 32, H) float tensors, as ORT fuses it on 3-D inputs
  (SkipLayerNormalization) and as the export writes it (on the rows, (1024, H): an Add and a
  LayerNormalization), H in 64, 128, 384, 768. See quantcli.onnx.norms.norms_on_rows.
- `group_norm`: a GroupNormalization (opset 21) of (32, 64, 16, 16) in 8 groups, as ORT inlines it and as
  the export writes it (quantcli.onnx.norms.group_norms).
- `channel_scale`: a per-channel scale before a per-tensor QuantizeLinear (the FFN equalization's, after GELU)
  on (1, 128, 1536), as a Mul and the QuantizeLinear and as one QuantizeLinear per axis (the scale divided
  into its scales), which the export does not write.
- `halves`: rotary embeddings' rotate_half, concat(-x2, x1) of the two halves of the last axis of
  (1, 8, 128, 64), the halves taken by one Split (what onnxscript's SlicesSplit rule makes) and by two
  Slices (what the export keeps: quantcli._torch.exporter._QUADRATIC_REWRITES).

Each form runs in its own session (graph optimizations on, as a user's session has them), sessions
interleaved round after round; medians in ms, one and two threads. A benchmark, not a test: it asserts
nothing, and its numbers depend on the machine and its load.

    python scripts/bench_kernels.py [--rounds 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from quantcli.onnx.norms import group_norms, norms_on_rows
from quantcli.quantizers.cpu import detect_cpu


def _model(nodes, inputs: dict, inits: dict) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "kernel",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def skip_norm(hidden: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    feed = {k: rng.normal(0, 1, (32, 32, hidden)).astype(np.float32) for k in ("x", "skip")}
    inits = {"gamma": np.ones(hidden, np.float32), "beta": np.zeros(hidden, np.float32)}
    nodes = [
        helper.make_node("Add", ["x", "skip"], ["sum"]),
        helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1),
    ]
    fused = _model(nodes, feed, inits)
    rows = _model(nodes, feed, inits)
    assert norms_on_rows(rows) == 1
    return {"SkipLayerNormalization (ORT's fusion)": fused, "Add + LayerNormalization on rows": rows}, feed


def group_norm() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    feed = {"x": rng.normal(0, 1, (32, 64, 16, 16)).astype(np.float32)}
    inits = {"scale": rng.uniform(0.5, 1.5, 64).astype(np.float32), "bias": rng.normal(0, 1, 64).astype(np.float32)}
    node = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=8)
    inlined, rewritten = _model([node], feed, inits), _model([node], feed, inits)
    assert group_norms(rewritten) == 1
    return {"GroupNormalization (inlined by ORT)": inlined, "InstanceNormalization + scale, bias": rewritten}, feed


def channel_scale() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    feed = {"x": rng.normal(0, 1, (1, 128, 1536)).astype(np.float32)}
    scale = rng.uniform(0.5, 2, 1536).astype(np.float32)
    mul = _model(
        [
            helper.make_node("Mul", ["x", "s"], ["m"]),
            helper.make_node("QuantizeLinear", ["m", "t", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "t", "z"], ["y"]),
        ],
        feed,
        {"s": scale, "t": np.array(0.05, np.float32), "z": np.array(128, np.uint8)},
    )
    per_axis = _model(
        [
            helper.make_node("QuantizeLinear", ["x", "ts", "zs"], ["q"], axis=2),
            helper.make_node("DequantizeLinear", ["q", "t", "z"], ["y"]),
        ],
        feed,
        {
            "ts": 0.05 / scale,
            "zs": np.full(1536, 128, np.uint8),
            "t": np.array(0.05, np.float32),
            "z": np.array(128, np.uint8),
        },
    )
    return {"Mul + QuantizeLinear": mul, "QuantizeLinear per axis": per_axis}, feed


def halves() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    feed = {"x": rng.normal(0, 1, (1, 8, 128, 64)).astype(np.float32)}
    rotate = [helper.make_node("Neg", ["x2"], ["n"]), helper.make_node("Concat", ["n", "x1"], ["y"], axis=-1)]
    split = _model(
        [helper.make_node("Split", ["x", "sizes"], ["x1", "x2"], axis=-1), *rotate],
        feed,
        {"sizes": np.array([32, 32], np.int64)},
    )
    bounds = {"b0": [0], "b1": [32], "b2": [64], "axes": [-1]}
    slices = _model(
        [
            helper.make_node("Slice", ["x", "b0", "b1", "axes"], ["x1"]),
            helper.make_node("Slice", ["x", "b1", "b2", "axes"], ["x2"]),
            *rotate,
        ],
        feed,
        {k: np.array(v, np.int64) for k, v in bounds.items()},
    )
    return {"Split": split, "two Slices": slices}, feed


def time_forms(forms: dict, feed: dict, threads: int, rounds: int) -> dict[str, float]:
    sessions = {}
    for name, model in forms.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions[name] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = [s.run(None, feed)[0] for s in sessions.values()]
    assert all(np.allclose(o, outputs[0], atol=0.051) for o in outputs), "the forms disagree"  # one code at most
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    print(f"CPU class: {detect_cpu()}; onnxruntime {ort.__version__}")
    cases = [(f"skip_norm H={h}", *skip_norm(h)) for h in (64, 128, 384, 768)] + [
        ("group_norm", *group_norm()),
        ("channel_scale", *channel_scale()),
        ("halves", *halves()),
    ]
    for label, forms, feed in cases:
        for threads in (1, 2):
            medians = time_forms(forms, feed, threads, args.rounds)
            (a, ta), (b, tb) = medians.items()
            print(f"{label:16} threads={threads}  {a}: {ta:.3f} ms  {b}: {tb:.3f} ms  ratio {ta / tb:.2f}x")


if __name__ == "__main__":
    main()
