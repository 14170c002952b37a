"""ONNX rewrites at export that let ONNX Runtime keep quantized tensors in integer, numerically equal.

- `global_average_pools`: a ReduceMean over all spatial axes of an (N, C, ...) tensor becomes
  GlobalAveragePool, which ORT runs as QLinearGlobalAveragePool between a DequantizeLinear and a
  QuantizeLinear (it has no integer ReduceMean). With keepdims=0 and a QuantizeLinear as the only
  consumer, the squeeze moves after the QuantizeLinear (per-tensor parameters commute with it).
- `integer_data_movement`: DequantizeLinear -> ops that only move or copy values (Reshape,
  Transpose, Slice, Split, Concat, Pad with 0...) -> QuantizeLinear, with one set of per-tensor
  parameters on every entry and exit, runs those ops on the integers instead. ORT does this
  itself for single ops it knows, but not for Pad, nor inside the several nodes one torch op
  exports as (torch.roll: Slice + Concat). A zero pad becomes a pad with the zero point.

- `group_norms` (quantcli.onnx.norms): a GroupNormalization, which ORT inlines into 17 float ops, becomes
  an InstanceNormalization and the per-channel scale and bias.
- `norms_on_rows` (quantcli.onnx.norms): a residual Add and the LayerNormalization after it, which ORT would
  fuse into its slow SkipLayerNormalization, run on (tokens, hidden) rows.
- `transposed_weights`: DequantizeLinear of an int8 weight -> Transpose (what a Linear on a 3-D input
  exports as) becomes a DequantizeLinear of the transposed int8 weight, its axis moved along. ORT
  does this itself only where the Transpose has one consumer: a weight shared by several layers
  (parameter sharing across blocks) kept its Transpose, and every MatMul reading it ran in float.
- `gathered_tables`: DequantizeLinear of an int8 table (an embedding, per row or per tensor) ->
  Gather becomes Gather of the int8 rows, then their scales: ORT keeps a DequantizeLinear of an
  initializer as it is (it folds none, for its QDQ fusions), so it would dequantize the whole
  table on every run, and a table it never sees quantized stays float. The same values: a row's
  (q - zero point) x scale.
- `hardsigmoids_as_adds`: DequantizeLinear -> HardSigmoid(alpha, beta) -> QuantizeLinear(scale S) whose grid
  lies within [0, 1] (the quantizer's fixed [0, 1] range of a gate) becomes an Add of beta / alpha with the
  QuantizeLinear's scale S / alpha: the same codes, the clip to [0, 1] being the QuantizeLinear's saturation.
  ORT has no integer HardSigmoid and ran each in float between a DequantizeLinear and a QuantizeLinear (as
  in its own quantized models); the Add, its constant quantized next, runs as a QLinearAdd. Hardswish
  (x * hardsigmoid(x)) is then a QLinearAdd and a QLinearMul.
- `quantized_constants`: an Add/Mul between a DequantizeLinear and QuantizeLinears whose other input is a
  float constant (a layer scale, an affine, an attention bias) gets that constant as uint8 behind a
  DequantizeLinear, so ORT runs QLinearAdd/QLinearMul where it ran the op in float.
- `shifts_into_biases`: Conv/Gemm -> QuantizeLinear -> DequantizeLinear -> Add of a constant (one value, or one
  a channel) -> QuantizeLinear, nothing else reading the values between: the constant joins the layer's bias
  and the layer's output goes to the last QuantizeLinear (one rounding less). A gate's shift (above) after a
  squeeze-excitation conv ran as a QLinearAdd on an (N, C, 1, 1) tensor, which ORT broadcasts one element
  at a time: 0.78 ms at batch 32 where the same values laid out (N, 1, 1, C) take 0.008.
- `scaled_passthroughs`: DequantizeLinear(scale s) -> Mul by a positive scalar c -> QuantizeLinear
  with scale s * c and the same zero point (what the quantizer makes of a query scaling) is the
  identity on the integers, and goes.

Value names of the graph's inputs and outputs stay; intermediate value_info is kept consistent,
so strict shape inference stays complete.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quantcli.onnx.graph import Graph, drop_initializers, insert, replace_each
from quantcli.onnx.norms import group_norms, norms_on_rows

_DATA_MOVEMENT = {
    "Reshape",
    "Transpose",
    "Slice",
    "Split",
    "Concat",
    "Gather",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Expand",
    "Tile",
    "Identity",
    "Pad",
    "DepthToSpace",
    "SpaceToDepth",
}
_NARROW_INDICES = 64  # constant indices beyond this many are stored narrow, then cast (a node's own bytes)
# Inputs that carry the data (the rest are shapes, indices, axes, pads: integers).
_DATA_INPUTS = {"Concat": None, "Pad": (0,)}


def rewrite(model: Any) -> Any:
    """Apply every rewrite of this module to `model` in place; return it."""
    global_average_pools(model)
    group_norms(model)
    norms_on_rows(model)
    transposed_weights(model)
    gathered_tables(model)
    scaled_passthroughs(model)
    hardsigmoids_as_adds(model)  # before shifts_into_biases and quantized_constants, which take its Add
    shifts_into_biases(model)
    quantized_constants(model)
    integer_data_movement(model)
    return model


# ------------------------------------------------------------------ ReduceMean -> GlobalAveragePool
def _spatial_mean(g: Graph, node) -> tuple[int, bool] | None:
    """(rank, keepdims) when `node` is a ReduceMean over every axis from 2 on, else None."""
    if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
        return None
    attrs = {a.name: a.i for a in node.attribute}
    rank = g.rank(node.input[0])
    axes = g.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if rank is None or rank < 3 or axes is None:
        return None
    if sorted(int(a) % rank for a in np.atleast_1d(axes)) != list(range(2, rank)):
        return None
    return rank, bool(attrs.get("keepdims", 1))


def global_average_pools(model: Any) -> int:
    """ReduceMean over the spatial axes -> GlobalAveragePool (see the module docstring); return how many."""
    g = Graph(model.graph)
    count, axes = 0, set()
    for node in list(g.graph.node):
        found = _spatial_mean(g, node)
        if found is None:
            continue
        rank, keepdims = found
        users = g.consumers.get(node.output[0], [])
        axes.update(node.input[1:])
        if keepdims:
            _replace_with_pool(node)
        elif (
            len(users) == 1
            and users[0].op_type == "QuantizeLinear"
            and g.per_tensor(users[0])
            and node.output[0] not in g.outputs
        ):
            _pool_then_squeeze(g, node, users[0], rank)
        else:
            continue
        count += 1
    _drop_unused(g, axes)  # the ReduceMeans' axes, where no other node reads them
    return count


def _replace_with_pool(node) -> None:
    del node.input[1:]
    del node.attribute[:]
    node.op_type = "GlobalAveragePool"


def _pool_then_squeeze(g: Graph, node, quantize, rank: int) -> None:
    """mean(keepdims=0) -> Q  becomes  GlobalAveragePool -> Q -> Squeeze; the squeeze takes the Q's output name."""
    from onnx import helper

    mean_out, squeezed = node.output[0], quantize.output[0]
    pooled, quantized = g.fresh(mean_out + "_pooled"), g.fresh(squeezed + "_pooled")
    _replace_with_pool(node)
    node.output[0] = quantize.input[0] = pooled
    quantize.output[0] = quantized
    axes = g.add_initializer(g.fresh(node.name + "_axes"), np.arange(2, rank, dtype=np.int64))
    squeeze = helper.make_node("Squeeze", [quantized, axes], [squeezed], name=g.fresh(node.name + "_squeeze"))
    squeeze.metadata_props.extend(node.metadata_props)
    insert(g.graph, squeeze, after=quantize)
    g.drop_value_info({mean_out})  # no longer produced; the squeezed value keeps the Q's value_info


# ------------------------------------------------------------------ weights stored transposed
def transposed_weights(model: Any) -> int:
    """DQ(int8 weight) -> Transpose -> DQ(transposed int8 weight) (see the module docstring); return how many."""
    from onnx import helper

    g = Graph(model.graph)
    made: dict[tuple, str] = {}  # (weight, perm) -> the output of its transposed DequantizeLinear
    released: set[str] = set()
    count = 0
    for node in list(g.graph.node):
        dq = g.producer.get(node.input[0]) if node.op_type == "Transpose" else None
        params = _weight_params(g, dq) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if params is None or node.output[0] in g.outputs:
            continue
        weight, axis = params
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(weight.ndim))[::-1])
        key = (dq.output[0], tuple(perm))
        if key in made:  # the same weight transposed the same way already: read that one
            _rename_input(g, node.output[0], made[key])
            g.graph.node.remove(node)
        else:
            transposed = np.ascontiguousarray(weight.transpose(perm))
            stored = g.add_initializer(g.fresh(f"{dq.input[0]}_transposed"), transposed)
            replacement = helper.make_node(
                "DequantizeLinear", [stored, *dq.input[1:]], [node.output[0]], name=g.fresh(f"{dq.name}_transposed")
            )
            if axis is not None:
                replacement.attribute.append(helper.make_attribute("axis", perm.index(axis)))
            replacement.metadata_props.extend(dq.metadata_props)
            insert(g.graph, replacement, replacing=node)
            made[key] = node.output[0]
        released |= set(dq.input)
        count += 1
    if count:
        _drop_unused(g, released)
    return count


def _weight_params(g: Graph, dq) -> tuple[np.ndarray, int | None] | None:
    """(int8 weight, axis or None when per tensor) of a DequantizeLinear of a constant, not blocked, else None."""
    weight, scale = g.constant(dq.input[0]), g.constant(dq.input[1])
    if weight is None or scale is None or weight.dtype not in (np.int8, np.uint8) or weight.ndim < 2:
        return None
    if any(a.name == "block_size" and a.i for a in dq.attribute):
        return None
    if scale.size == 1 and scale.ndim <= 1:
        return weight, None
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % weight.ndim
    return (weight, axis) if scale.shape == (weight.shape[axis],) else None


def _rename_input(g: Graph, old: str, new: str) -> None:
    """Make every reader of `old` read `new` instead."""
    g.rename_input(old, new)
    g.drop_value_info({old})


# ------------------------------------------------------------------ int8 tables gathered, then scaled
def gathered_tables(model: Any) -> int:
    """DQ(int8 table) -> Gather(axis 0) -> Gather of int8 rows, then scaled (see the module docstring); how many."""
    g = Graph(model.graph)
    released: set[str] = set()
    count = 0
    for dq in [n for n in g.graph.node if n.op_type == "DequantizeLinear"]:
        params = _table_params(g, dq)
        if params is None:
            continue
        for gather in [u for u in g.consumers.get(dq.output[0], []) if _gathers_rows(u, dq.output[0])]:
            insert(g.graph, _gather_then_scale(g, dq, gather, *params), replacing=gather)
            released |= set(dq.input) | {gather.input[1]}  # the indices: dropped where none reads them now
            count += 1
    if count:
        _drop_unused(g, released)
    return count


def _table_params(g: Graph, dq) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(scale, zero point, axis) of a DequantizeLinear of a constant 8-bit table of rank >= 2, per tensor or
    per row (axis 0), else None."""
    table = g.constant(dq.input[0])
    scale = g.constant(dq.input[1])
    zero = g.constant(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.int8)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if table is None or scale is None or zero is None or table.dtype not in (np.int8, np.uint8) or table.ndim < 2:
        return None
    if any(a.name == "block_size" and a.i for a in dq.attribute):
        return None
    if scale.size == 1:
        return scale, zero, -1
    if axis % table.ndim == 0 and scale.shape == (table.shape[0],):
        return scale, zero, 0
    return None


def _gathers_rows(node, table: str) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.input[0] == table and axis == 0


def _gather_then_scale(g: Graph, dq, gather, scale: np.ndarray, zero: np.ndarray, axis: int) -> list:
    """The nodes replacing `gather`: the int8 rows gathered, then dequantized (per tensor) or scaled per row.

    Constant indices (positions of a fixed sequence length) select their rows here: the file keeps only those.
    Constant indices that select more rows than the table has (a relative-position bias's) are kept in the
    narrowest unsigned type that holds them, cast to int32 when the model runs.
    Where the rows have at most 256 distinct scales (quantcli's embedding observer puts them on such a grid),
    the file keeps each row's index among them in one byte, and the scales are gathered through it.
    """
    from onnx import TensorProto, helper

    out, indices = gather.output[0], gather.input[1]
    name = gather.name or out
    table, fixed = g.constant(dq.input[0]), g.constant(indices)
    fold = fixed is not None and fixed.size < table.shape[0]
    nodes: list = []

    def node(op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        nodes.append(g.new_node(gather, op, inputs, output, **attrs))
        return nodes[-1].output[0]

    if fixed is not None and not fold and fixed.size > _NARROW_INDICES and 0 <= fixed.min() and fixed.max() < 2**16:
        narrow = fixed.astype(np.uint8 if fixed.max() < 2**8 else np.uint16)  # 1 or 2 bytes an index, not 8
        indices = node("Cast", [g.add_initializer(g.fresh(f"{name}_indices"), narrow)], to=TensorProto.INT32)

    def rows(array: np.ndarray, base: str, stored: str | None = None) -> str:
        if fold:
            return g.add_initializer(g.fresh(f"{name}_{base}"), np.take(array, fixed, axis=0))
        return node("Gather", [stored or g.add_initializer(g.fresh(f"{name}_{base}"), array), indices], axis=0)

    if axis == -1:  # one scale: dequantize the gathered rows with it
        node("DequantizeLinear", [rows(table, "rows", dq.input[0]), *dq.input[1:]], out)
        return nodes
    column = (1,) * (table.ndim - 1)  # a row's scale broadcasts over the row
    values = node("Cast", [rows(table, "rows", dq.input[0])], to=helper.np_dtype_to_tensor_dtype(scale.dtype))
    if np.any(zero):
        values = node("Sub", [values, rows(zero.astype(scale.dtype).reshape(zero.shape + column), "zero_points")])
    scales = scale.reshape(scale.shape + column)
    grid, codes = np.unique(scales, return_inverse=True)
    if not fold and len(grid) <= min(256, len(scales) // 2):  # a byte a row: its index among distinct scales
        grid = g.add_initializer(g.fresh(f"{name}_scale_grid"), grid.reshape((-1,) + column))
        index = node("Cast", [rows(codes.reshape(-1).astype(np.uint8), "scale_codes")], to=TensorProto.INT32)
        scales_of_rows = node("Gather", [grid, index], axis=0)
    else:
        scales_of_rows = rows(scales, "row_scales")
    node("Mul", [values, scales_of_rows], out)
    return nodes


# ------------------------------------------------------------------ x * c between equal integers
def _scalar(g: Graph, name: str) -> float | None:
    value = g.constant(name)
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def scaled_passthroughs(model: Any) -> int:
    """Remove DQ(s, z) -> Mul(c > 0) -> Q(s * c, z) (see the module docstring); return how many."""
    g = Graph(model.graph)
    count, released = replace_each(g, _scaled_passthrough, _skip_passthrough)
    if count:
        _drop_unused(g, released)
    return count


def _skip_passthrough(g: Graph, mul, dq, q) -> set[str]:
    for user in g.consumers.get(q.output[0], []):
        for k, name in enumerate(user.input):
            if name == q.output[0]:
                user.input[k] = dq.input[0]
    g.graph.node.remove(mul)
    g.graph.node.remove(q)
    g.drop_value_info({mul.output[0], q.output[0]})
    return set(mul.input) | set(q.input[1:])


def _scaled_passthrough(g: Graph, mul) -> tuple | None:
    """(DQ, Q) around `mul` when they and its scalar cancel out, else None."""
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    users = g.consumers.get(mul.output[0], [])
    if len(users) != 1 or users[0].op_type != "QuantizeLinear" or users[0].output[0] in g.outputs:
        return None
    for data, const in (mul.input, mul.input[::-1]):
        dq, factor = g.producer.get(data), _scalar(g, const)
        if dq is None or dq.op_type != "DequantizeLinear" or factor is None or not factor > 0:
            continue
        a, b = _qparams(g, dq), _qparams(g, users[0])
        if a is not None and b is not None and a[1:] == b[1:] and abs(a[0] * factor - b[0]) <= 1e-5 * b[0]:
            return dq, users[0]
    return None


# ------------------------------------------------------------------ a gate's HardSigmoid as a shifted requantization
def hardsigmoids_as_adds(model: Any) -> int:
    """DQ -> HardSigmoid -> Q within [0, 1] becomes DQ -> Add(beta / alpha) -> Q(scale / alpha) (see the module
    docstring); return how many."""
    from onnx import helper

    g = Graph(model.graph)
    gates = [(node, *found) for node in list(g.graph.node) if (found := _gate_to_requantize(g, node)) is not None]
    for node, q, alpha, beta, scale in gates:
        shift = g.add_initializer(g.fresh(f"{node.name}_shift"), np.array(beta / alpha, np.float32))
        q.input[1] = g.add_initializer(g.fresh(f"{q.input[1]}_gate"), np.array(scale / alpha, np.float32))
        add = helper.make_node("Add", [node.input[0], shift], list(node.output), name=node.name)
        insert(g.graph, add, replacing=node)
    return len(gates)


def _gate_to_requantize(g: Graph, node) -> tuple | None:
    """(the Q, alpha, beta, the Q's scale) of a HardSigmoid read by one QuantizeLinear alone whose codes all lie
    in [0, 1], after a per-tensor DQ; else None."""
    if node.op_type != "HardSigmoid" or node.domain not in ("", "ai.onnx") or node.output[0] in g.outputs:
        return None
    attrs = {a.name: a.f for a in node.attribute}
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    users, dq = g.consumers.get(node.output[0], []), g.producer.get(node.input[0])
    if len(users) != 1 or users[0].op_type != "QuantizeLinear" or not alpha > 0:
        return None
    if dq is None or dq.op_type != "DequantizeLinear" or _qparams(g, dq) is None:
        return None
    params = _qparams(g, users[0])
    if params is None or params[1] not in _CODE_RANGES:
        return None
    scale, dtype, zero = params
    low, high = _CODE_RANGES[dtype]
    if scale <= 0 or (low - zero) * scale < 0 or (high - zero) * scale > 1 + 1e-6:
        return None
    return users[0], alpha, beta, scale


_CODE_RANGES = {np.dtype(np.uint8).str: (0, 255), np.dtype(np.int8).str: (-128, 127)}


# ------------------------------------------------------------------ a constant added to a layer's output
def shifts_into_biases(model: Any) -> int:
    """Conv/Gemm -> Q -> DQ -> Add(constant) -> Q', nothing else reading the first three outputs: the constant (one
    value, or one a channel) joins the layer's bias, and the layer feeds Q' (see the module docstring); how many."""
    g = Graph(model.graph)
    count, released = replace_each(g, _shift_after_layer, _shift_into_bias)
    if count:
        _drop_unused(g, released)  # the float biases and constants no other node reads
    return count


def _shift_into_bias(g: Graph, add, layer, q, dq, k: int, bias: np.ndarray) -> set[str]:
    released = {layer.input[2], *q.input[1:], *dq.input[1:], add.input[k]}
    layer.input[2] = g.add_initializer(g.fresh(f"{layer.input[2]}_shifted"), bias)
    for user in g.consumers[add.output[0]]:
        user.input[0] = layer.output[0]
    for node in (q, dq, add):
        g.graph.node.remove(node)
    g.drop_value_info({q.output[0], dq.output[0], add.output[0]})
    return released


def _shift_after_layer(g: Graph, add) -> tuple | None:
    """(layer, Q, DQ, index of the constant, the shifted bias) when `add` adds a constant to a Conv's or Gemm's
    requantized output alone (see shifts_into_biases), else None."""
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    users = g.consumers.get(add.output[0], [])
    if not users or add.output[0] in g.outputs or any(u.op_type != "QuantizeLinear" for u in users):
        return None
    for k in (0, 1):
        dq, value = g.op(add.input[1 - k], "DequantizeLinear"), g.constant(add.input[k])
        q = None if dq is None else g.op(dq.input[0], "QuantizeLinear")
        layer = None if q is None else g.producer.get(q.input[0])
        if value is None or value.dtype != np.float32 or layer is None or layer.op_type not in ("Conv", "Gemm"):
            continue
        bias = g.initializer(layer.input[2]) if len(layer.input) > 2 else None
        only = all(len(g.consumers.get(v, [])) == 1 and v not in g.outputs for v in (layer.output[0], q.output[0]))
        rank = g.rank(layer.output[0])
        if bias is None or bias.ndim != 1 or not only or g.consumers.get(dq.output[0]) != [add] or rank is None:
            continue
        per_channel = (1, bias.size) + (1,) * (rank - 2)  # one value a channel, as it broadcasts on the output
        if value.size == 1 or (value.ndim <= rank and (1,) * (rank - value.ndim) + value.shape == per_channel):
            return layer, q, dq, k, (bias + value.reshape(-1)).astype(np.float32)
    return None


# ------------------------------------------------------------------ constant operands of Add/Mul
_BINARY = ("Add", "Mul")


def quantized_constants(model: Any) -> int:
    """DQ(x) -> Add/Mul with a float constant -> Q: the constant becomes DQ(uint8 constant); return how many.

    The quantizer gives such an op's activation and output Q/DQ but not its constant (the exporter folds a
    constant's DequantizeLinear into a float initializer), and ORT fuses Add/Mul into QLinearAdd/QLinearMul
    only with every input dequantized. The constant is quantized per tensor over its own range (0 included),
    as ORT's quantize_static does: a layer scale, an affine's scale or shift, an attention bias table.
    """
    g = Graph(model.graph)
    found = [(node, *match) for node in list(g.graph.node) if (match := _constant_operand(g, node)) is not None]
    released = {node.input[k] for node, k, _ in found}
    for node, k, value in found:
        _dequantized_constant(g, node, k, value)
    if found:
        _drop_unused(g, released)  # the float constants no other node reads
    return len(found)


def _dequantized_constant(g: Graph, node, k: int, value: np.ndarray) -> None:
    """Input k of `node`, a float constant -> DequantizeLinear(uint8 per tensor over [min(value, 0), max(value, 0)])."""
    from onnx import helper

    low, high = min(float(value.min()), 0.0), max(float(value.max()), 0.0)
    scale = np.array((high - low) / 255 if high > low else 1.0, np.float32)
    zero = np.array(np.clip(np.round(-low / scale), 0, 255), np.uint8)
    codes = np.clip(np.round(value / scale) + zero, 0, 255).astype(np.uint8)
    base = g.fresh(f"{node.input[k]}_quantized")
    names = [g.add_initializer(base, codes), g.add_initializer(f"{base}_scale", scale)]
    names.append(g.add_initializer(f"{base}_zero_point", zero))
    dq = helper.make_node("DequantizeLinear", names, [g.fresh(f"{base}_dequantized")], name=g.fresh(f"{base}_dq"))
    insert(g.graph, dq, before=node)
    node.input[k] = dq.output[0]


def _constant_operand(g: Graph, node) -> tuple[int, np.ndarray] | None:
    """(index, value) of a float constant input of an Add/Mul between a per-tensor DQ and Qs only (a Relu between
    them too), else None."""
    if node.op_type not in _BINARY or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    output = node.output[0]
    users = g.consumers.get(output, [])
    if len(users) == 1 and users[0].op_type == "Relu" and output not in g.outputs:  # ORT drops a Relu before Q
        output = users[0].output[0]
        users = g.consumers.get(output, [])
    if not users or output in g.outputs or any(u.op_type != "QuantizeLinear" for u in users):
        return None
    for k in (0, 1):
        dq, value = g.producer.get(node.input[1 - k]), g.constant(node.input[k])
        if dq is None or dq.op_type != "DequantizeLinear" or _qparams(g, dq) is None:
            continue
        if value is not None and value.dtype == np.float32 and value.size and np.all(np.isfinite(value)):
            return k, value
    return None


# ------------------------------------------------------------------ integer data movement
def _data_inputs(node) -> list[str]:
    picked = _DATA_INPUTS.get(node.op_type, (0,))
    return [i for i in node.input if i] if picked is None else [node.input[k] for k in picked if k < len(node.input)]


def _movable(g: Graph, node) -> bool:
    if node.op_type not in _DATA_MOVEMENT or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Pad":
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        fill = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
        return mode == "constant" and fill is not None and not np.any(fill)
    return True


def _qparams(g: Graph, qdq) -> tuple | None:
    scale = g.constant(qdq.input[1])
    zero = g.constant(qdq.input[2]) if len(qdq.input) > 2 and qdq.input[2] else None
    if scale is None or zero is None or scale.size != 1 or zero.size != 1:
        return None
    return float(scale.reshape(())), zero.dtype.str, int(zero.reshape(()))


def _region(g: Graph, start, movable: dict) -> tuple[list, list, list] | None:
    """The connected data-movement nodes around `start`, their entry DQs and exit Qs, or None if it leaks."""
    nodes, entries, exits, todo = [], [], [], [start]
    seen = {id(start)}
    while todo:
        node = todo.pop()
        nodes.append(node)
        for name in _data_inputs(node):
            parent = g.producer.get(name)
            if parent is None:
                return None
            if parent.op_type == "DequantizeLinear":
                entries.append((parent, node))
            elif movable.get(id(parent)):
                if id(parent) not in seen:
                    seen.add(id(parent))
                    todo.append(parent)
            else:
                return None
        for out in node.output:
            if out in g.outputs:
                return None
            for user in g.consumers.get(out, []):
                if user.op_type == "QuantizeLinear" and user.input[0] == out and user.output[0] not in g.outputs:
                    exits.append(user)
                elif movable.get(id(user)) and out in _data_inputs(user):
                    if id(user) not in seen:
                        seen.add(id(user))
                        todo.append(user)
                else:
                    return None
    return nodes, entries, exits


def integer_data_movement(model: Any) -> int:
    """Run DQ -> data movement -> Q regions on the integers (see the module docstring); return how many regions."""
    g = Graph(model.graph)
    movable = {id(n): _movable(g, n) for n in g.graph.node}
    done: set[int] = set()
    released: set[str] = set()  # scales and zero points of removed Q/DQ nodes
    count = 0
    for node in list(g.graph.node):
        if not movable[id(node)] or id(node) in done:
            continue
        region = _region(g, node, movable)
        if region is None:
            continue
        nodes, entries, exits = region
        done.update(id(n) for n in nodes)
        params = {_qparams(g, q) for q in [dq for dq, _ in entries] + exits}
        if not entries or not exits or len(params) != 1 or None in params:
            continue
        released |= {name for q in [dq for dq, _ in entries] + exits for name in q.input[1:]}
        _to_integers(g, nodes, entries, exits, params.pop())
        count += 1
    if count:
        _drop_unused(g, released)
    return count


def _to_integers(g: Graph, nodes: list, entries: list, exits: list, params: tuple) -> None:
    from onnx import TensorProto, helper

    _, dtype, zero = params
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for dq, user in entries:
        for k, name in enumerate(user.input):
            if name == dq.output[0]:
                user.input[k] = dq.input[0]
    for node in nodes:
        if node.op_type == "Pad":
            fill = g.add_initializer(g.fresh(node.name + "_zero_point"), np.array(zero, dtype=np.dtype(dtype)))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = fill
        for out in node.output:
            if out in g.types and g.types[out].elem_type != TensorProto.UNDEFINED:
                g.types[out].elem_type = elem
    for q in exits:
        source = q.input[0]
        for user in g.consumers.get(q.output[0], []):
            for k, name in enumerate(user.input):
                if name == q.output[0]:
                    user.input[k] = source
        g.graph.node.remove(q)
    g.drop_value_info({q.output[0] for q in exits})


def _drop_unused(g: Graph, released: set[str]) -> None:
    """Remove DequantizeLinear nodes (and Casts of their parameters) left without users, and the released
    initializers nothing reads any more."""
    while True:
        used = {i for n in g.graph.node for i in n.input} | g.outputs
        dead = [n for n in g.graph.node if n.op_type in ("DequantizeLinear", "Cast") and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            released.update(n.input)
            g.graph.node.remove(n)
        g.drop_value_info({n.output[0] for n in dead})
    drop_initializers(g.graph, released)
