"""The int16 pair saturation of ORT's u8 x s8 kernels on x86 without VNNI, counted and emulated on a QDQ model.

A layer is exposed when ORT runs it in a pairing kernel (quantcli.quantizers.pairs): a Conv (not
depthwise) followed by QuantizeLinear, a MatMul or a Gemm, whose input is a DequantizeLinear of a
uint8 tensor and whose weight a DequantizeLinear of an int8 initializer. `saturable_pairs` counts,
from the int8 weights alone, the pairs some uint8 input (255 at worst) overflows. `emulate` returns
a model that computes, run with graph optimizations off, what the target computes: each exposed
layer's float output minus, for its saturable pairs, (pair sum - the pair sum clipped to int16)
times the input and weight scales. The pair sums are those of the raw uint8 input (the kernel
subtracts the zero point after the sum), padded with the zero point as the kernel pads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from quantcli.onnx.graph import Graph
from quantcli.quantizers.pairs import INT16_MAX, INT16_MIN, k_rows, saturable


@dataclass
class Layer:
    node: Any  # the Conv/MatMul/Gemm
    name: str  # the module it came from, else the node's name
    x_q: str  # the uint8 tensor its input DequantizeLinear reads
    x_scale: float
    x_zero_point: int
    q: np.ndarray  # int8 weight as stored
    w_scale: np.ndarray  # per output channel
    out_axis: int
    conv: bool


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _quantized_output(g: Graph, tensor: str) -> bool:
    """Whether `tensor` feeds only a QuantizeLinear, directly or through one Relu/Clip (which ORT folds)."""
    users = g.consumers.get(tensor, [])
    if len(users) == 1 and users[0].op_type in ("Relu", "Clip"):
        users = g.consumers.get(users[0].output[0], [])
    return [u.op_type for u in users] == ["QuantizeLinear"]


def _layer(node: Any, g: Graph) -> Layer | None:
    from quantcli.onnx.export import origin

    if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
        return None
    dq_x, dq_w = g.op(node.input[0], "DequantizeLinear"), g.op(node.input[1], "DequantizeLinear")
    if dq_x is None or dq_w is None or len(dq_x.input) < 3 or g.initializer(dq_x.input[2]) is None:
        return None
    q, zp = g.initializer(dq_w.input[0]), g.initializer(dq_x.input[2])
    if q is None or q.dtype != np.int8 or zp.dtype != np.uint8:
        return None
    conv = node.op_type == "Conv"
    if conv:
        group = _attr(node, "group", 1)
        if q.shape[1] == 1 and q.shape[0] == group:
            return None  # depthwise: MLAS's depthwise kernels widen before multiplying
        if not _quantized_output(g, node.output[0]):
            return None  # no QLinearConv without the output QuantizeLinear
        out_axis = 0
    elif node.op_type == "Gemm":
        out_axis = 0 if _attr(node, "transB", 0) else 1
    else:
        out_axis = q.ndim - 1
    w_scale = np.broadcast_to(np.asarray(g.initializer(dq_w.input[1]), np.float64).reshape(-1), (q.shape[out_axis],))
    return Layer(
        node,
        origin(node)["module"] or node.name,
        dq_x.input[0],
        float(g.initializer(dq_x.input[1])),
        int(zp),
        q,
        w_scale,
        out_axis,
        conv,
    )


def exposed_layers(model: Any) -> list[Layer]:
    """The layers ORT runs in a pairing u8 x s8 kernel, in graph order."""
    g = Graph(model.graph)
    return [layer for layer in (_layer(n, g) for n in model.graph.node) if layer is not None]


def saturable_pairs(model: Any) -> dict[str, int]:
    """Per exposed layer, the pairs of its int8 weights some uint8 input can saturate (0 expected)."""
    counts: dict[str, int] = {}
    for layer in exposed_layers(model):
        n = int(saturable(k_rows(layer.q, layer.out_axis, layer.conv)).sum())
        counts[layer.name] = counts.get(layer.name, 0) + n
    return counts


def _pair_taps(layer: Layer) -> list[tuple[int, int, int]]:
    """(output channel, k, k + 1) of each saturable pair, k in the kernel's K order."""
    mask = saturable(k_rows(layer.q, layer.out_axis, layer.conv))
    return [(int(c), 2 * int(j), 2 * int(j) + 1) for c, j in zip(*np.nonzero(mask))]


def _conv_pairs(layer: Layer, taps: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(input channel of each pair's two taps (2 per pair), the (pairs, 2, *kernel) weights of a conv with one
    group per pair): each pair's two weights at their kernel positions, zeros elsewhere (and for the zero MLAS
    pads an odd K with)."""
    q = layer.q
    out, cin_g, kernel = q.shape[0], q.shape[1], q.shape[2:]
    per_group = out // _attr(layer.node, "group", 1)
    channels = np.zeros(2 * len(taps), np.int64)
    weights = np.zeros((len(taps), 2, *kernel), np.float32)
    for p, (c, *ks) in enumerate(taps):
        for t, k in enumerate(ks):
            if k >= q[0].size:
                continue
            position, channel = divmod(k, cin_g)
            at = tuple(int(i) for i in np.unravel_index(position, kernel))
            channels[2 * p + t] = c // per_group * cin_g + channel
            weights[(p, t, *at)] = q[(c, channel, *at)]
    return channels, weights


def _matrix_pair_weights(layer: Layer, taps: list[tuple[int, int, int]]) -> np.ndarray:
    """(K, pairs): each pair's two weights in its column."""
    rows = k_rows(layer.q, layer.out_axis, False)
    weights = np.zeros((rows.shape[1], len(taps)), np.float32)
    for p, (c, *ks) in enumerate(taps):
        for k in ks:
            if k < rows.shape[1]:
                weights[k, p] = rows[c, k]
    return weights


def _correction(layer: Layer, taps: list[tuple[int, int, int]], add: Any) -> str:
    """Add the nodes computing sum over saturable pairs of (pair - clip(pair)) * scales; the result's name."""
    from onnx import TensorProto

    out = layer.q.shape[layer.out_axis]
    a = add("Cast", [layer.x_q], to=TensorProto.FLOAT)
    select = np.zeros((len(taps), out), np.float32)
    for p, (c, _, _) in enumerate(taps):
        select[p, c] = 1.0
    scales = (layer.x_scale * layer.w_scale).astype(np.float32)
    if layer.conv:
        rank = layer.q.ndim - 2
        pads = _attr(layer.node, "pads", [0] * (2 * rank))
        padded = add(
            "Pad",
            [
                a,
                add.const(np.array([0, 0, *pads[:rank], 0, 0, *pads[rank:]], np.int64)),
                add.const(np.array(float(layer.x_zero_point), np.float32)),
            ],
        )
        channels, weights = _conv_pairs(layer, taps)  # each pair sees only its two input channels
        picked = add("Gather", [padded, add.const(channels)], axis=1)
        pairs = add(
            "Conv",
            [picked, add.const(weights)],
            group=len(taps),
            strides=_attr(layer.node, "strides", [1] * rank),
            dilations=_attr(layer.node, "dilations", [1] * rank),
        )
        select = select.T.reshape(out, len(taps), *[1] * rank)
        scales = scales.reshape(out, *[1] * rank)
    else:
        pairs = add("MatMul", [a, add.const(_matrix_pair_weights(layer, taps))])
    bounds = [add.const(np.array(bound, np.float32)) for bound in (INT16_MIN, INT16_MAX)]
    clipped = add("Clip", [pairs, *bounds])
    excess = add("Sub", [pairs, clipped])
    summed = add("Conv" if layer.conv else "MatMul", [excess, add.const(select)])
    return add("Mul", [summed, add.const(scales)])


class _Adder:
    """Appends nodes and initializers to a graph under fresh names."""

    def __init__(self, model: Any, prefix: str) -> None:
        self.model, self.prefix, self.count = model, prefix, 0

    def _name(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count}"

    def const(self, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self._name()
        self.model.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def __call__(self, op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        name = self._name()
        self.model.graph.node.append(helper.make_node(op, inputs, [out or name], name=name, **attrs))
        return out or name


def emulate(model: Any) -> tuple[Any, dict[str, int]]:
    """(a copy of `model` that computes what a saturating target computes, saturable pairs per layer).

    Run it with graph optimizations off (quantcli.onnx.runtime.session(optimize=False)).
    """
    import copy

    emulated = copy.deepcopy(model)
    counts: dict[str, int] = {}
    add = _Adder(emulated, "quantcli_u8s8_")
    for layer in exposed_layers(emulated):
        taps = _pair_taps(layer)
        counts[layer.name] = counts.get(layer.name, 0) + len(taps)
        if not taps:
            continue
        y = layer.node.output[0]  # its consumers (or the graph output) now read the corrected value
        layer.node.output[0] = exact = f"{y}_without_saturation"
        add("Sub", [exact, _correction(layer, taps, add)], out=y)
    _topological_sort(emulated)
    return emulated, counts


def _topological_sort(model: Any) -> None:
    """Reorder the nodes so each comes after its inputs' producers (the correction nodes were appended)."""
    nodes = list(model.graph.node)
    produced = {o: n.name for n in nodes for o in n.output}
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    ordered, pending = [], nodes
    while pending:
        rest = []
        for n in pending:
            if all(i == "" or i in available or i not in produced for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("the emulated graph has a cycle")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
