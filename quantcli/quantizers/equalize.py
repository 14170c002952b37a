"""Data-free SmoothQuant-style equalization of the FFN down-projection input.

In trained transformers a few channels of GELU(fc1(LayerNorm(x))) are far larger than the
rest; one per-tensor uint8 range for the fc2 input then leaves the other channels a handful of
levels. For each LayerNorm -> Linear -> GELU -> Linear chain we estimate every channel's range
from the weights alone (the LayerNorm output is gamma * n + beta with n of unit variance per
token, so fc1 channel j is about N(W1[j].beta + b1[j], ||W1[j] * gamma||^2)), and where a
channel's estimate exceeds OUTLIER_RATIO x the median we divide the activation by
s_j = sqrt(estimate_j / median) and multiply fc2's weight column by s_j. The division is a
float Mul before the quantized fc2 input; the product is exact in float.

The rewrite depends only on the captured weights, so re-running prepare in another process
gives the same graph, the same buffers and the same state_dict keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import GraphModule, Node

from quantcli.quantizers.graphpass import STAYS_FLOAT, rewrite_each
from quantcli.quantizers.rewrites import get_attr_value as _attr
from quantcli.quantizers.rewrites import set_parameter as _set_attr

aten = torch.ops.aten
OUTLIER_RATIO = 4.0
SIGMAS = 3.0
_PASS = {aten.dropout.default, aten.clone.default}
_GELU = {aten.gelu.default}
_LINEAR = {aten.linear.default}
_LAYER_NORM = {aten.layer_norm.default}


def _skip_passthrough(node: Node) -> Node:
    while isinstance(node, Node) and node.op == "call_function" and node.target in _PASS:
        node = node.args[0]
    return node


def channel_scales(gamma, beta, w1, b1, w2_cols: int) -> torch.Tensor | None:
    """s_j >= 1 per fc2 input channel, or None where no channel stands out."""
    with torch.no_grad():
        mean = w1 @ beta + (b1 if b1 is not None else 0.0)
        std = (w1 * gamma).norm(dim=1)
        estimate = torch.nn.functional.gelu(mean + SIGMAS * std).clamp(min=1e-6).double()
        ratio = estimate / estimate.median()
        if ratio.max() <= OUTLIER_RATIO or estimate.numel() != w2_cols:
            return None
        return torch.where(ratio > OUTLIER_RATIO, ratio.sqrt(), torch.ones_like(ratio)).float()


def _ffn_chain(model: GraphModule, fc2: Node):
    """(gamma, beta, w1, b1) when fc2's input is GELU(Linear(LayerNorm(x))), else None."""
    gelu = _skip_passthrough(fc2.args[0])
    if not (isinstance(gelu, Node) and gelu.target in _GELU and len(gelu.users) == 1):
        return None
    fc1 = gelu.args[0]
    if not (isinstance(fc1, Node) and fc1.target in _LINEAR and len(fc1.users) == 1):
        return None
    ln = _skip_passthrough(fc1.args[0])
    if not (isinstance(ln, Node) and ln.target in _LAYER_NORM and len(ln.args) >= 4):
        return None
    gamma, beta = _attr(model, ln.args[2]), _attr(model, ln.args[3])
    w1 = _attr(model, fc1.args[1])
    b1 = _attr(model, fc1.args[2]) if len(fc1.args) > 2 else None
    if gamma is None or beta is None or w1 is None or w1.dim() != 2:
        return None
    return gamma, beta, w1, b1


def equalize_ffn(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """Rewrite every LayerNorm-Linear-GELU-Linear chain whose fc2 `wanted(fc2)`; return how many."""

    def rewrite(fc2: Node, done: int) -> bool:
        scales = _scales_for(model, fc2) if fc2.op == "call_function" and fc2.target in _LINEAR else None
        if scales is None or not wanted(fc2):
            return False
        _smooth(model, fc2, scales, f"_quantcli_smooth_{done}")
        return True

    return rewrite_each(model, rewrite)


def _scales_for(model: GraphModule, fc2: Node) -> torch.Tensor | None:
    w2 = _attr(model, fc2.args[1])
    chain = _ffn_chain(model, fc2) if w2 is not None and w2.dim() == 2 else None
    return channel_scales(*chain, w2.shape[1]) if chain is not None else None


def _smooth(model: GraphModule, fc2: Node, scales: torch.Tensor, name: str) -> None:
    """fc2(x) -> fc2'(x * (1/s)) with fc2' = fc2's weight columns times s (a new Parameter)."""
    w2 = _attr(model, fc2.args[1])
    inverse = (1.0 / scales).half().float()  # a value float16 holds: the file stores it in 2 bytes (export.tidy)
    _set_attr(model, fc2.args[1].target, w2.detach() / inverse)
    model.register_buffer(name, inverse.detach())
    with model.graph.inserting_before(fc2):
        inv = model.graph.get_attr(name)
        inv.meta["val"] = model.get_buffer(name)
        mul = model.graph.call_function(aten.mul.Tensor, (fc2.args[0], inv))
    mul.meta["val"] = fc2.args[0].meta["val"]
    mul.meta["nn_module_stack"] = fc2.meta.get("nn_module_stack", {})  # excluded with fc2
    # quantizing its input per tensor would undo the equalization: the outlier channels are that input's
    mul.meta[STAYS_FLOAT] = "FFN equalization"
    fc2.replace_input_with(fc2.args[0], mul)
