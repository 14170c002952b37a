"""Float islands: ops ORT runs in float between a DequantizeLinear and a QuantizeLinear, and where they came from.

`island_nodes` defines an island on ORT's optimized graph; `ALLOWED` (and `ALLOWED_TORCH_OPS`,
`GELU_MODULE`) say which kinds may stay float: ops ORT's CPU provider has no integer kernel for,
and Softmax, kept float on purpose for attention accuracy. `Origins` maps optimized nodes back to
the exported nodes, whose metadata names the module and torch op (quantcli.onnx.export.origin).
quantcli.quantizers.selection applies the same definition to the torch graph, to quantize what
would otherwise be an island.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from quantcli.onnx.graph import FLOAT_TYPES, producers
from quantcli.onnx.graph import consumers as node_consumers

# Op types (any domain) that carry out a Conv/MatMul/Gemm in integer arithmetic.
INTEGER_KERNELS = frozenset(
    {
        "QLinearConv",
        "ConvInteger",
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QGemm",
        "QAttention",
        "DynamicQuantizeLSTM",
        "QLinearConvTranspose",
        "MatMulNBits",
    }
)
FLOAT_KERNELS = frozenset(
    {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "NhwcFusedConv"}
)

# Float ops between a DequantizeLinear and a QuantizeLinear that are allowed to stay: ORT's CPU
# provider has no integer kernel for them, or (Softmax) they stay float on purpose, for attention
# accuracy. Keyed by ORT op type, or by the torch op a node was exported from (an unfused GELU's Erf
# subgraph, a HardSwish ORT inlined as HardSigmoid and Mul).
ALLOWED = {
    "LayerNormalization": "layer norm: no integer kernel",
    "SkipLayerNormalization": "layer norm (fused with its residual add): no integer kernel",
    "SimplifiedLayerNormalization": "RMS norm: no integer kernel",
    "SkipSimplifiedLayerNormalization": "RMS norm (fused with its residual add): no integer kernel",
    "RMSNormalization": "RMS norm: no integer kernel",
    "EmbedLayerNormalization": "embedding + layer norm: no integer kernel",
    "Gelu": "GELU: no integer kernel",
    "FastGelu": "GELU: no integer kernel",
    "BiasGelu": "GELU (fused with its bias): no integer kernel",
    "QuickGelu": "GELU: no integer kernel",
    "HardSwish": "HardSwish: no integer kernel",
    "HardSigmoid": "HardSigmoid: no integer kernel",
    "InstanceNormalization": "normalization: no integer kernel",
    "GroupNormalization": "normalization: no integer kernel",
    "GroupNorm": "normalization: no integer kernel",
    "BatchNormalization": "normalization: no integer kernel",
    "LpNormalization": "normalization: no integer kernel",
    "MeanVarianceNormalization": "normalization: no integer kernel",
    "Softmax": "Softmax: float on purpose (attention accuracy)",
    "ConvTranspose": "ConvTranspose: no integer kernel on ORT's CPU provider",
}
ALLOWED_TORCH_OPS = {
    "aten.gelu.default": "GELU: no integer kernel",
    "aten.hardswish.default": "HardSwish: no integer kernel",
    "aten.hardswish_.default": "HardSwish: no integer kernel",
    "aten.hardsigmoid.default": "HardSigmoid: no integer kernel",
    "aten.hardsigmoid_.default": "HardSigmoid: no integer kernel",
    "aten.batch_norm.default": "normalization: no integer kernel",
    "aten.instance_norm.default": "normalization: no integer kernel",
    "aten.rms_norm.default": "RMS norm: no integer kernel",
    "aten.layer_norm.default": "layer norm: no integer kernel",
    "aten.group_norm.default": "normalization: no integer kernel",
    "aten.native_group_norm.default": "normalization: no integer kernel",
    "aten.native_layer_norm.default": "layer norm: no integer kernel",
    "aten.softmax.int": "Softmax: float on purpose (attention accuracy)",
    "aten._softmax.default": "Softmax: float on purpose (attention accuracy)",
}
# GELU written out op by op (transformers' NewGELUActivation: tanh, pow, mul, add), recognized by the
# class of the module it runs in when ORT does not fuse it into FastGelu.
GELU_MODULE = re.compile(r"gelu", re.IGNORECASE)
# Ops whose outputs are not floating point even when fed floats (so no float path continues).
_NOT_FLOAT_OUT = frozenset(
    {
        "Shape",
        "Size",
        "ArgMax",
        "ArgMin",
        "NonZero",
        "Equal",
        "Greater",
        "GreaterOrEqual",
        "Less",
        "LessOrEqual",
        "Not",
        "And",
        "Or",
        "Xor",
        "IsNaN",
        "IsInf",
        "QuantizeLinear",
        "DynamicQuantizeLinear",
    }
)


def is_integer_kernel(node) -> bool:
    """Any of ORT's quantized kernels (QLinear*, QGemm, MatMulInteger..., QAttention...)."""
    return node.op_type in INTEGER_KERNELS or (node.domain == "com.microsoft" and node.op_type.startswith("QLinear"))


def _float_outputs(node) -> list[str]:
    if node.op_type in _NOT_FLOAT_OUT:
        return []
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), 0)
        return list(node.output) if to in FLOAT_TYPES else []
    if node.op_type == "TopK":
        return [node.output[0]]
    return [o for o in node.output if o]


def float_kernel_outputs(node) -> list[str]:
    """The float outputs of an integer kernel that dequantizes its own result (MatMulIntegerToFloat, a QGemm
    with no output scale, ...): a DequantizeLinear in all but name."""
    if node.op_type == "QGemm":
        # A, its scale and zero point, B, its scale and zero point, C (the bias), y_scale: none, a float output
        return [] if len(node.input) > 7 and node.input[7] else list(node.output)
    if node.op_type in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"):
        return list(node.output)
    return []


def island_nodes(
    graph, stays_float: Callable[[Any], bool] = lambda node: False, from_float_kernels: bool = False
) -> list:
    """The nodes of `graph` that run in float between a DequantizeLinear and a QuantizeLinear.

    A node is in a float island when a float value leaving a DequantizeLinear reaches it, and a
    float value it produces reaches the data input of a QuantizeLinear, both through float nodes
    only. Integer kernels, quantize and dequantize nodes end such paths (their inputs or outputs
    are integers), and so do ops whose outputs are not floats (Shape, Equal...). Each such node
    costs a float copy of its output plus a dequantize/quantize pass that an integer kernel, or a
    rewrite removing it, would not need.

    Ops that stay float by design (`stays_float`: LayerNorm, GELU, HardSwish...) end such paths
    too, and are islands themselves (allowed ones) when both paths reach them: what lies beyond
    a LayerNorm is float by design, as a transformer's residual stream is, not a float island
    of its own. So in DQ -> LayerNorm -> Add -> Q the LayerNorm is an (allowed) island and the
    Add is none; in DQ -> Add -> LayerNorm -> Q both are, and the Add is a defect.
    `from_float_kernels` also starts float paths at integer kernels' float outputs
    (`float_kernel_outputs`): the sweep counts the ops behind them apart. Returned in graph order.
    """
    producer, consumers = producers(graph.node), node_consumers(graph.node)
    stop = lambda n: n.op_type in ("QuantizeLinear", "DequantizeLinear") or is_integer_kernel(n)  # noqa: E731
    reached, floats = set(), set()
    frontier = [o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output]
    if from_float_kernels:
        frontier += [o for n in graph.node for o in float_kernel_outputs(n)]
    floats.update(frontier)
    while frontier:
        for n in consumers.get(frontier.pop(), []):
            if stop(n) or id(n) in reached:
                continue
            reached.add(id(n))
            new = [] if stays_float(n) else [o for o in _float_outputs(n) if o not in floats]
            floats.update(new)
            frontier.extend(new)
    marked: set[int] = set()  # nodes from which a float path leads to a QuantizeLinear
    feeding = [n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"]
    seen: set[str] = set()
    while feeding:
        name = feeding.pop()
        node = producer.get(name)
        if name in seen or node is None or stop(node) or name not in _float_outputs(node):
            continue
        seen.add(name)
        marked.add(id(node))
        if not stays_float(node):
            feeding.extend(i for i in node.input if i)
    marked &= reached
    return [n for n in graph.node if id(n) in marked]


class Origins:
    """Maps nodes of ORT's optimized graph back to the exported nodes, and so to modules.

    ORT keeps a node's name when it only moves it, names a fused node after the node it replaces
    plus a `_token_<n>` suffix (QLinearConv `node_conv2d_token_7` for `node_conv2d`), and leaves
    nodes it inlines from a function (HardSwish as HardSigmoid and Mul) unnamed, with new value
    names. So a node maps by its name without those suffixes, else by the exported node producing
    one of its outputs, else through the producers of its inputs in ORT's graph: a node inlined
    behind a DequantizeLinear maps to the exported node that consumes that DequantizeLinear.
    """

    _QDQ = ("QuantizeLinear", "DequantizeLinear")

    def __init__(self, exported, optimized):
        self.by_name = {n.name: n for n in exported.node if n.name}
        self.producer = producers(exported.node)
        self.consumers = node_consumers(n for n in exported.node if n.op_type not in self._QDQ)
        self.ort_producer = producers(optimized.node)
        self.memo: dict[int, object] = {}

    def _by_name(self, node):
        name = node.name
        while name:
            if name in self.by_name:
                return self.by_name[name]
            stripped = re.sub(r"_token_\d+$", "", name)
            if stripped == name:
                return None
            name = stripped
        return None

    def exported_node(self, node, depth: int = 0):
        """The exported node `node` stands for, or None."""
        if id(node) in self.memo:
            return self.memo[id(node)]
        found = self._by_name(node) or next((self.producer[o] for o in node.output if o in self.producer), None)
        for i in node.input if found is None and depth < 8 else ():
            parent = self.ort_producer.get(i)
            source = self.exported_node(parent, depth + 1) if parent is not None else None
            if source is not None and source.op_type in self._QDQ:
                users = [u for o in source.output for u in self.consumers.get(o, [])]
                source = users[0] if users else None
            if source is not None:
                found = source
                break
        self.memo[id(node)] = found
        return found

    def origin(self, node) -> dict[str, str]:
        """{"module", "module_type", "torch_op", "exported_op"} of `node` (empty strings where unknown)."""
        from quantcli.onnx.export import origin

        source = self.exported_node(node)
        if source is None:
            return {"module": "", "module_type": "", "torch_op": "", "exported_op": ""}
        return {**origin(source), "exported_op": source.op_type}


def allowance(op_type: str, origin: dict[str, str]) -> str:
    """Why an island node may stay float, or "" when it is a defect."""
    if GELU_MODULE.search(origin["module_type"]):
        return f"GELU written out ({origin['module_type']}): no integer kernel"
    return ALLOWED.get(op_type) or ALLOWED.get(origin["exported_op"]) or ALLOWED_TORCH_OPS.get(origin["torch_op"]) or ""
