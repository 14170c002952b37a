"""Which Conv/MatMul/Gemm of a QDQ model ONNX Runtime actually runs as integer kernels.

ORT fuses DQ -> Conv -> Q into QLinearConv (and MatMul/Gemm/Add/pooling likewise) only when
the annotation suits its selectors; otherwise the op runs in float between DequantizeLinear
and QuantizeLinear. `integer_op_report` optimizes the model the way a deployment would
(ORT_ENABLE_ALL) and counts what is left.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

# Op types (any domain) that carry out a Conv/MatMul/Gemm in integer arithmetic.
INTEGER_KERNELS = frozenset({
    "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QGemm", "QAttention", "DynamicQuantizeLSTM", "QLinearConvTranspose",
    "MatMulNBits",
})
FLOAT_KERNELS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul",
                           "FusedGemm", "NhwcFusedConv"})


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
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        return onnx.load(str(out)).graph


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
