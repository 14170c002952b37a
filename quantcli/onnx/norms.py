"""Normalizations written in the ops ONNX Runtime has kernels for, numerically equal.

`group_norms`: a GroupNormalization (opset 21: a scale and a bias per channel) becomes an
InstanceNormalization over the input reshaped to (N, groups, -1), reshaped back, then the
per-channel scale and bias (one InstanceNormalization with that scale and bias where each channel is
its own group). ORT's CPU provider has no GroupNormalization kernel: it inlines the op's function,
17 float ops a norm between the DequantizeLinear and QuantizeLinear around it (Casts, Reshapes, the
variance as E[x^2] - E[x]^2), where ORT's own quantizer leaves 6 (it quantizes the function's Mul and
Add). InstanceNormalization is one kernel: 1.5-2.5x faster than the inlined function on (32, 64, 16, 16),
and closer to float64 (it subtracts the mean before squaring).

`norms_on_rows`: an Add of two tensors of one (batch, tokens, hidden) shape read only by a LayerNormalization
over the hidden axis (a post-norm transformer's residual) runs on the rows, (batch x tokens, hidden), and the
norm's output is shaped back. On 3-D inputs ORT fuses the pair into one SkipLayerNormalization, whose CPU
kernel is a scalar loop with a division an element: 1.6-4.8x the time of the Add and LayerNormalization on
1024 rows of 64 to 768, one and two threads (scripts/bench_kernels.py). A linear's output already comes as
rows (a Gemm): the Add takes them as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quantcli.onnx.graph import Graph, drop_initializers, insert, opset_of, replace_each


def group_norms(model: Any) -> int:
    """Rewrite every opset-21 GroupNormalization of float32 constants (see the module docstring); how many."""
    if opset_of(model) < 21:  # before 21 the scale and bias were per group
        return 0
    g = Graph(model.graph)
    count, released = replace_each(g, _group_norm, _as_instance_norm)
    if count:
        drop_initializers(g.graph, released)
    return count


def _as_instance_norm(g: Graph, norm, *found) -> set[str]:
    insert(g.graph, _instance_norm(g, norm, *found), replacing=norm)
    return set(norm.input[1:])


def _group_norm(g: Graph, node) -> tuple[int, float, np.ndarray, np.ndarray] | None:
    """(groups, epsilon, scale, bias) of a GroupNormalization this rewrite takes, else None."""
    from onnx import helper

    if node.op_type != "GroupNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    groups, stash = attrs.get("num_groups"), attrs.get("stash_type", 1)
    scale, bias = g.constant(node.input[1]), g.constant(node.input[2])
    rank = g.rank(node.input[0])
    if scale is None or bias is None or scale.dtype != np.float32 or bias.dtype != np.float32 or stash != 1:
        return None  # float32 constants: the data is float32 too (one type T for all three)
    if not groups or scale.ndim != 1 or scale.shape != bias.shape or scale.size % groups or rank is None or rank < 3:
        return None
    return groups, float(attrs.get("epsilon", 1e-5)), scale, bias


def _instance_norm(g: Graph, norm, groups: int, epsilon: float, scale: np.ndarray, bias: np.ndarray) -> list:
    """The nodes that compute `norm`'s output: InstanceNormalization and, over several channels a group, the
    reshapes around it and the per-channel scale and bias."""
    x, out, rank = norm.input[0], norm.output[0], g.rank(norm.input[0])
    name = norm.name or out
    nodes: list = []

    def node(op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        nodes.append(g.new_node(norm, op, inputs, output, **attrs))
        return nodes[-1].output[0]

    def constant(base: str, array: np.ndarray) -> str:
        return g.add_initializer(g.fresh(f"{name}_{base}"), array)

    if groups == scale.size:  # a group a channel: InstanceNormalization with the scale and bias
        node("InstanceNormalization", [x, constant("scale", scale), constant("bias", bias)], out, epsilon=epsilon)
        return nodes
    per_group = constant("groups_shape", np.array([0, groups, -1], np.int64))  # 0: the batch size as it is
    ones, zeros = np.ones(groups, np.float32), np.zeros(groups, np.float32)
    dq = g.op(x, "DequantizeLinear")
    if dq is not None and g.per_tensor(dq) and g.consumers.get(x) == [norm] and x not in g.outputs:
        x = dq.input[0]  # reshape the integers, then dequantize: no float copy for the reshape
        grouped = node("DequantizeLinear", [node("Reshape", [x, per_group]), *dq.input[1:]])
        g.graph.node.remove(dq)
    else:
        grouped = node("Reshape", [x, per_group])
    normed = node("InstanceNormalization", [grouped, constant("ones", ones), constant("zeros", zeros)], epsilon=epsilon)
    shaped = node("Reshape", [normed, node("Shape", [x])])
    column = (-1,) + (1,) * (rank - 2)  # a channel's value broadcasts over its positions
    affine = [("Mul", scale, np.all(scale == 1)), ("Add", bias, not np.any(bias))]
    kept = [(op, value) for op, value, identity in affine if not identity]
    if not kept:
        nodes[-1].output[0] = out
        return nodes
    for k, (op, value) in enumerate(kept):
        shaped = node(op, [shaped, constant(op.lower(), value.reshape(column))], out if k == len(kept) - 1 else None)
    return nodes


def norms_on_rows(model: Any) -> int:
    """Run every residual Add and LayerNormalization ORT would fuse on 2-D rows (see the module docstring); how many."""
    g = Graph(model.graph)
    count, _ = replace_each(g, _residual_norm, _on_rows)
    return count


def _residual_norm(g: Graph, norm) -> tuple[Any, int] | None:
    """(the Add, the hidden size) where ORT would fuse Add -> `norm` into a SkipLayerNormalization, else None."""
    from onnx import helper

    if norm.op_type != "LayerNormalization" or norm.domain not in ("", "ai.onnx"):
        return None
    axis = next((helper.get_attribute_value(a) for a in norm.attribute if a.name == "axis"), -1)
    add = g.op(norm.input[0], "Add")
    if add is None or axis not in (-1, 2) or g.consumers.get(add.output[0]) != [norm] or add.output[0] in g.outputs:
        return None
    shapes = [g.types[i].shape.dim if i in g.types and g.types[i].HasField("shape") else None for i in add.input]
    if any(s is None or len(s) != 3 for s in shapes) or any(a != b for a, b in zip(*shapes, strict=True)):
        return None  # the fusion's condition: both 3-D, one shape
    hidden = shapes[0][2]
    return (add, hidden.dim_value) if hidden.HasField("dim_value") else None


def _on_rows(g: Graph, norm, add, hidden: int) -> set[str]:
    shape = None  # the (batch, tokens, hidden) shape to give the norm's output back
    rows_shape = None
    before = []
    for k, x in enumerate(add.input):
        reshape = g.op(x, "Reshape")
        only_add = g.consumers.get(x) == [add] and x not in g.outputs
        if reshape is not None and only_add and _rows_of(g, reshape.input[0], hidden):
            add.input[k], shape = reshape.input[0], shape or reshape.input[1]  # a linear's rows, as they came
            g.graph.node.remove(reshape)
            g.drop_value_info({x})
            continue
        if rows_shape is None:
            name = g.fresh(f"{norm.name or norm.output[0]}_rows_shape")
            rows_shape = g.add_initializer(name, np.array([-1, hidden], np.int64))
        before.append(g.new_node(add, "Reshape", [x, rows_shape]))
        add.input[k] = before[-1].output[0]
    after = []
    if shape is None:
        after.append(g.new_node(norm, "Shape", [x]))  # x: the Add's last input, not reshaped away
        shape = after[-1].output[0]
    out = norm.output[0]
    norm.output[0] = g.fresh(f"{out}_rows")
    after.append(g.new_node(norm, "Reshape", [norm.output[0], shape], out))
    g.drop_value_info({add.output[0]})
    insert(g.graph, before, before=add)
    insert(g.graph, after, after=norm)
    return set()


def _rows_of(g: Graph, name: str, hidden: int) -> bool:
    """Whether `name` is 2-D with `hidden` columns: (tokens, hidden) rows, which the reshape after it only shapes."""
    t = g.types.get(name)
    dims = t.shape.dim if t is not None and t.HasField("shape") else []
    return len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value == hidden
