"""Makes the converted model's int8 weights pair-safe where the recipe asks for pair-safe weights.

PTQ's pair-safe observers leave nothing to do. In QAT, convert folds the batch norm with its final
statistics and quantizes the weights after the last optimizer step, which the observers did not
see: a few same-sign pairs can then exceed |q[k] + q[k+1]| = 128 by a unit or two. Each such pair
loses the excess from its larger weight (one or two LSB of one weight), so no pair can saturate
on the target. Only weights whose setting is pair-safe are touched (an override with
reduce_range false keeps its 8 bits as asked).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quantcli.quantizers.cpu import PAIR_SAFE
from quantcli.quantizers.pairs import PAIR_LIMIT, k_rows
from quantcli.quantizers.policy import Policy
from quantcli.recipe import QuantizationSection


def fix_rows(rows: np.ndarray) -> int:
    """Lower, in place, the larger weight of each same-sign pair over PAIR_LIMIT; the count of weights changed."""
    changed = 0
    for sign in (1, -1):
        r = rows * sign
        for c, j in zip(*np.nonzero(np.clip(r[:, 0:-1:2], 0, None) + np.clip(r[:, 1::2], 0, None) > PAIR_LIMIT)):
            k = 2 * j + int(r[c, 2 * j + 1] > r[c, 2 * j])
            other = max(int(r[c, 2 * j + 1 - (k - 2 * j)]), 0)
            rows[c, k] = sign * (PAIR_LIMIT - other)
            changed += 1
    return changed


def _pairing(node: Any, torch: Any) -> tuple[Any, bool] | None:
    """(the weight's dequantize node, conv?) of a layer ORT runs in its pairing u8 x s8 kernel."""
    aten = torch.ops.aten
    convs = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
    if node.target in convs:
        return node.args[1], True
    if node.target in (aten.linear.default, aten.matmul.default):
        return node.args[1], False
    if node.target is aten.addmm.default:
        return node.args[2], False
    return None


def enforce(module: Any, q: QuantizationSection) -> int:
    """Make every pair-safe layer's int8 weight pair-safe in `module` (a converted GraphModule); the count changed."""
    from quantcli import _torch

    torch = _torch.torch
    qd = torch.ops.quantized_decomposed
    policy = Policy(q, qat=False)
    changed = 0
    for node in module.graph.nodes:
        found = _pairing(node, torch) if node.op == "call_function" else None
        if found is None:
            continue
        dq, conv = found
        setting = policy.setting(node)
        if setting is None or setting.reduce_range != PAIR_SAFE or not setting.w_symmetric:
            continue
        if getattr(dq, "target", None) not in (qd.dequantize_per_channel.default, qd.dequantize_per_tensor.default):
            continue
        holder = dq.args[0]
        if holder.op != "get_attr":
            continue
        weight = getattr(module, holder.target)
        groups = node.args[6] if conv and len(node.args) > 6 else 1
        if weight.dtype != torch.int8 or conv and weight.shape[1] == 1 and weight.shape[0] == groups:
            continue  # depthwise: MLAS's depthwise kernels add no pairs
        changed += _fix_tensor(weight, _out_axis(node, dq, weight, torch) % weight.dim(), conv, torch)
    return changed


def _out_axis(node: Any, dq: Any, weight: Any, torch: Any) -> int:
    """The weight's output-channel axis: the per-channel axis, else the layer's (as quantizers.onnxruntime
    annotates)."""
    aten = torch.ops.aten
    if dq.target is torch.ops.quantized_decomposed.dequantize_per_channel.default:
        return dq.args[3]
    return {aten.addmm.default: 1, aten.matmul.default: weight.dim() - 1}.get(node.target, 0)


def _fix_tensor(weight: Any, axis: int, conv: bool, torch: Any) -> int:
    w = weight.numpy()
    rows = k_rows(w, axis, conv).astype(np.int64)
    n = fix_rows(rows)
    if n:
        moved = np.moveaxis(w, axis, 0)
        shape = (moved.shape[0], *moved.shape[2:], moved.shape[1]) if conv and w.ndim > 2 else moved.shape
        back = rows.reshape(shape)
        if conv and w.ndim > 2:
            back = np.moveaxis(back, -1, 1)
        weight.copy_(torch.from_numpy(np.ascontiguousarray(np.moveaxis(back, 0, axis)).astype(np.int8)))
    return n
