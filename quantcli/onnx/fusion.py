"""Which Conv/MatMul/Gemm of a QDQ model ONNX Runtime actually runs as integer kernels, and what stays float.

ORT fuses DQ -> Conv -> Q into QLinearConv (and MatMul/Gemm/Add/pooling likewise) only when
the annotation suits its selectors; otherwise the op runs in float between DequantizeLinear
and QuantizeLinear. Both reports optimize the model the way a deployment would (ORT_ENABLE_ALL,
CPU): `integer_op_report` counts op types, `analyze` gives the integer-kernel coverage and every
float island with the module it came from (quantcli.onnx.islands).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from quantcli.artifacts import data_path
from quantcli.onnx.islands import FLOAT_KERNELS, INTEGER_KERNELS, Origins, allowance, island_nodes


def optimized_graph(onnx_path: str | Path, threads: int = 1):
    """The ONNX graph ORT runs after ORT_ENABLE_ALL optimizations (CPU provider)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="quantcli-ort-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        if data_path(Path(onnx_path)).exists():  # a model over protobuf's limit: its optimized form is one too
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        return onnx.load(str(out), load_external_data=False).graph  # the nodes; initializers by name


def integer_op_report(onnx_path: str | Path) -> dict:
    """Counts after ORT optimization: every op type, and Conv/MatMul/Gemm float vs integer.

    Returns {"op_types": {type: n}, "integer": n, "float": n, "integer_ops": {type: n},
    "float_ops": {type: n}, "quantize": n, "dequantize": n}.
    """
    graph = optimized_graph(onnx_path)
    ops = Counter(node.op_type for node in graph.node)
    integer = {t: n for t, n in ops.items() if t in INTEGER_KERNELS}
    floating = {t: n for t, n in ops.items() if t in FLOAT_KERNELS}
    return {
        "op_types": dict(sorted(ops.items())),
        "integer": sum(integer.values()),
        "float": sum(floating.values()),
        "integer_ops": integer,
        "float_ops": floating,
        "quantize": ops.get("QuantizeLinear", 0) + ops.get("DynamicQuantizeLinear", 0),
        "dequantize": ops.get("DequantizeLinear", 0),
    }


def analyze(onnx_path: str | Path, *, weight_only: bool = False) -> dict:
    """Integer-kernel coverage and float islands of a QDQ model in ORT's optimized graph (CPU, ORT_ENABLE_ALL).

    Returns {"coverage": {"integer": n, "total": n, "integer_ops": {...}, "float_ops": {...}},
    "islands": [{"op_type", "name", "module", "module_type", "torch_op", "allowed", "reason"}, ...]}
    where coverage counts Conv/MatMul/Gemm (and their fused forms) run as integer kernels against
    all of them, and islands lists every node `island_nodes` finds, in graph order, with the module
    it came from (the exported file's node metadata, see quantcli.onnx.export.origin) and
    whether it is one of the allowed kinds (`ALLOWED`).
    """
    import onnx

    exported = onnx.load(str(onnx_path), load_external_data=False).graph
    graph = optimized_graph(onnx_path)
    ops = Counter(node.op_type for node in graph.node)
    integer = {t: n for t, n in sorted(ops.items()) if t in INTEGER_KERNELS}
    floating = {t: n for t, n in sorted(ops.items()) if t in FLOAT_KERNELS}
    origins = Origins(exported, graph)
    reasons = {id(n): allowance(n.op_type, origins.origin(n)) for n in graph.node}
    islands = []
    for node in island_nodes(graph, lambda n: bool(reasons[id(n)])):
        origin = origins.origin(node)
        reason = reasons[id(node)]
        islands.append(
            {
                "op_type": node.op_type,
                "name": node.name,
                "module": origin["module"],
                "module_type": origin["module_type"],
                "torch_op": origin["torch_op"],
                "allowed": bool(reason),
                "reason": reason,
            }
        )
    found = {
        "coverage": {
            "integer": sum(integer.values()),
            "total": sum(integer.values()) + sum(floating.values()),
            "integer_ops": integer,
            "float_ops": floating,
        },
        "islands": islands,
    }
    if weight_only:
        found["weight_only"] = {
            "matmul_nbits": ops.get("MatMulNBits", 0),
            "gather_block_quantized": ops.get("GatherBlockQuantized", 0),
            "float_linears": float_linears(graph, origins),
        }
    return found


def float_linears(graph, origins: Origins) -> list[dict]:
    """The MatMul/Gemm nodes of ORT's optimized graph that read a constant float weight: linears left in float
    (excluded ones, or ones ORT did not fuse into MatMulNBits), with the module each came from."""
    constants = {t.name for t in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type in FLOAT_KERNELS and len(node.input) > 1 and node.input[1] in constants:
            origin = origins.origin(node)
            found.append({"op_type": node.op_type, "name": node.name, "module": origin["module"]})
    return found


def coverage_warning(analysis: dict) -> str | None:
    """A warning when fewer than half of the convs/matmuls run as integer kernels, or none was quantized.

    Peers emit unquantized graphs silently; a model with no conv or matmul (nothing to judge) gets none.
    """
    integer, total = analysis["coverage"]["integer"], analysis["coverage"]["total"]
    if total == 0 or 2 * integer >= total:
        return None
    what = "none" if integer == 0 else f"only {integer}"
    return (
        f"{what} of {total} convs/matmuls run as integer kernels in ONNX Runtime: the int8 model may be "
        "no faster than fp32 (`quantcli inspect` lists the float ops and their modules)"
    )
