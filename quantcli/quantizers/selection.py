"""Which nodes the onnxruntime target quantizes: every conv and matmul, and what would otherwise be a float island.

Conv/Linear/addmm/MatMul are always quantized, and so are embedding tables (int8 rows; their
output stays float, as ORT's Gather-then-scale gives it). Another op of a known kind (patterns.KIND) is
quantized where a quantized consumer follows (so its output reaches that consumer as integers),
and where it would otherwise run in float between a DequantizeLinear and a QuantizeLinear (a
float island, see quantcli.onnx.islands.island_nodes): reached by a dequantized value through
float ops, and reaching a quantized input through float ops, neither path crossing an op that
stays float by design (LayerNorm, GELU, Softmax, Hardswish...: islands.ALLOWED_TORCH_OPS). Each
decision can create the conditions for another, so both rules run to a fixed point.

The ops beyond a LayerNorm are float by design, as in any transformer's residual stream, so
they are not quantized for being there: quantizing a ViT's residual stream (per-tensor uint8)
took its output from 29.6 to 8.6 dB SQNR against fp32.
"""

from __future__ import annotations

from torch.fx import Graph, Node

from quantcli.onnx.islands import ALLOWED_TORCH_OPS, GELU_MODULE
from quantcli.quantizers.graphpass import STAYS_FLOAT
from quantcli.quantizers.patterns import (
    KIND,
    PADS,
    WEIGHTED,
    absorbed_pad,
    global_pool,
    is_activation,
    is_float,
    is_weight,
    is_zero_pad,
    positive_scalar,
    split_source,
    value,
)
from quantcli.quantizers.policy import Policy, module_scope


def quantizable(node: Node) -> bool:
    """Whether the op and its inputs are of a kind this quantizer handles (float tensors only)."""
    kind = KIND.get(node.target)
    if kind is None or node.op != "call_function":
        return False
    if kind in ("split", "getitem"):
        return _splittable(node if kind == "split" else split_source(node))
    if not is_float(node):
        return False
    return _CHECKS.get(kind, _first_is_activation)(node)


def _first_is_activation(node: Node) -> bool:
    return is_activation(node.args[0])


def _weighted(node: Node) -> bool:
    x, w = node.args[0], node.args[1]
    return is_activation(x) and is_weight(w)


def _addmm(node: Node) -> bool:
    bias, x, w = node.args[:3]
    plain = all(node.kwargs.get(k, 1) == 1 for k in ("beta", "alpha"))
    return plain and is_activation(x) and is_weight(w) and is_weight(bias) and value(bias).dim() == 1


def _matmul(node: Node) -> bool:
    a, b = node.args[0], node.args[1]
    return is_activation(a) and (is_activation(b) or is_weight(b))


def _binary(node: Node) -> bool:
    """Two activations, or an activation and a constant tensor (QLinearAdd/QLinearMul), or an activation times
    a positive scalar.

    A constant operand gets no observer here: the exporter would fold its DequantizeLinear into a float
    initializer anyway; quantcli.onnx.rewrite quantizes it in the file, where ORT then fuses the op.
    """
    if STAYS_FLOAT in node.meta:
        return False
    if positive_scalar(node) is not None:
        return True
    a, b = node.args[:2]
    operands = (is_activation(a) and (is_activation(b) or is_weight(b))) or (is_weight(a) and is_activation(b))
    return operands and node.kwargs.get("alpha", 1) == 1


def _embedding(node: Node) -> bool:
    weight, indices = node.args[:2]
    return is_weight(weight) and value(weight).dim() == 2 and not is_float(indices)


def _cat(node: Node) -> bool:
    return all(is_activation(a) for a in node.args[0])


def _pool(node: Node) -> bool:
    return is_activation(node.args[0]) and global_pool(node)


def _shared(node: Node) -> bool:
    if node.target in PADS:  # ORT pads uint8 only with the zero point (quantcli.onnx.rewrite)
        return is_activation(node.args[0]) and is_zero_pad(node)
    return is_activation(node.args[0])


def _splittable(split: Node | None) -> bool:
    return split is not None and is_activation(split.args[0])


_CHECKS = {
    "conv": _weighted,
    "conv_transpose": _weighted,
    "linear": _weighted,
    "addmm": _addmm,
    "matmul": _matmul,
    "binary": _binary,
    "embedding": _embedding,
    "cat": _cat,
    "pool": _pool,
    "shared": _shared,
}


def quantized_nodes(graph: Graph, policy: Policy) -> set[Node]:
    """The nodes to annotate (see the module docstring)."""
    candidates = {n for n in graph.nodes if quantizable(n) and not stays_float(n) and policy.setting(n) is not None}
    chosen = {n for n in candidates if KIND[n.target] in (*WEIGHTED, "embedding")}
    while True:
        _close_backwards(graph, candidates, chosen)
        islands = _islands(graph, candidates, chosen)
        if not islands:
            return chosen
        chosen |= islands


def _close_backwards(graph: Graph, candidates: set[Node], chosen: set[Node]) -> None:
    """Add every candidate one of whose users is chosen (walking backwards sees users first)."""
    for node in reversed(graph.nodes):
        if node in candidates and node not in chosen and any(u in chosen for u in node.users):
            chosen.add(node)


def quantized_output(node: Node, chosen: set[Node]) -> bool:
    """Whether the node's output will carry Q/DQ (so every consumer reads a dequantized value)."""
    if node not in chosen:
        return False
    kind = KIND[node.target]
    if kind in ("linear", "addmm", "matmul"):
        return any(u in chosen for u in node.users)
    return kind not in ("split", "embedding")


def _islands(graph: Graph, candidates: set[Node], chosen: set[Node]) -> set[Node]:
    """Candidates not chosen yet that sit on a float path from a dequantized value to a quantized input."""
    reached: set[Node] = set()
    for node in graph.nodes:  # topological: producers first
        if node in chosen or node.op != "call_function" or not is_float(node) or stays_float(node):
            continue
        if any(quantized_output(a, chosen) or a in reached for a in node.all_input_nodes):
            reached.add(node)
    reaching: set[Node] = set()
    for node in reversed(graph.nodes):
        if node not in reached:
            continue
        if any(u in chosen and _quantizes_input(u, node) or u in reaching for u in node.users):
            reaching.add(node)
    return {n for n in reached & reaching if n in candidates}


def stays_float(node: Node) -> bool:
    """An op left in float on purpose (no integer kernel in ORT, or Softmax): float paths end there.

    GELU written out op by op counts as GELU, known by its module's class (NewGELUActivation).
    """
    types = module_scope(node)[1]
    return str(node.target) in ALLOWED_TORCH_OPS or bool(types and GELU_MODULE.search(types[-1]))


def _quantizes_input(user: Node, node: Node) -> bool:
    """Whether chosen `user` quantizes its input `node` (a pad absorbed into a conv does not)."""
    if KIND.get(user.target) == "conv" and absorbed_pad(user) is node:
        return False
    return True
