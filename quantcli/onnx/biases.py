"""The int32 biases of quantized Conv/Gemm nodes stored in the bytes ONNX Runtime needs, values unchanged.

A quantized layer's bias is DequantizeLinear(int32 codes, scale, zero point 0) where the scale is the
input's scale times the weight's (per output channel): ORT's QLinearConv and QGemm read the codes and
nothing else. The exporter writes the scale as a float tensor of its own and the zero point as int32
zeros: with the codes, 12 bytes an output channel where ORT's own quantizer stores fewer (ResMLP-12:
97 KB of scales and zero points, its file larger than ORT's). `compact` stores, for each such bias:

- no zero point (0 is DequantizeLinear's default);
- the scale as a Mul of the input's and the weight's scales, which the graph already holds, where that
  product is bit for bit the stored scale (it is how the quantizer derived it);
- the codes in the narrowest integer type that holds them (int8 or int16), widened by a Cast to int32.

The Mul and the Cast are written only where the bytes they save exceed their own (not on a layer of a
few output channels).

ORT folds a Mul or Cast of initializers when it loads the model, before its QDQ fusions, so its
optimized graph (QLinearConv, QGemm) is the one it was, and every value is as it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quantcli.onnx.graph import Graph, consumers, drop_initializers, insert

_LAYERS = {"Conv", "Gemm"}  # the ops ORT fuses with an int32 bias (QLinearConv, QGemm)
_NARROWER = (np.int8, np.int16)


def compact(model: Any) -> int:
    """Rewrite every int32 bias of `model` as above, in place; how many biases."""
    g = Graph(model.graph)
    biases = [dq for dq in model.graph.node if _bias(g, dq)]
    products: dict[tuple[str, str], str] = {}
    new_nodes, released = [], set()
    for dq in biases:
        if len(dq.input) > 2 and _zeros(g, dq.input[2]):
            released.add(dq.input[2])
            del dq.input[2:]
        layer = g.consumers[dq.output[0]][0]
        x_scale, w_scale = (g.producer[layer.input[i]].input[1] for i in (0, 1))
        key = (x_scale, w_scale)
        if key not in products and _is_product(g, dq.input[1], x_scale, w_scale):
            mul = _node("Mul", [x_scale, w_scale], g.fresh(f"{dq.input[1]}_product"), g)
            if mul.ByteSize() < g.inits[dq.input[1]].ByteSize():  # a layer of few channels: the scale is smaller
                new_nodes.append(mul)
                products[key] = mul.output[0]
        if key in products:
            released.add(dq.input[1])
            dq.input[1] = products[key]
    ours, users = {id(dq) for dq in biases}, consumers(model.graph.node)  # as they read now: no zero points
    for codes in dict.fromkeys(dq.input[0] for dq in biases):  # in graph order: the same file in every process
        readers = users[codes]
        if any(id(r) not in ours or codes in r.input[1:] for r in readers):
            continue  # read elsewhere too (as a zero point, say): left as it is
        narrowed = _narrowed(g.initializer(codes))
        if narrowed is None:
            continue
        stored = g.fresh(f"{codes}_{narrowed.dtype.name}")
        cast = _node("Cast", [stored], g.fresh(f"{codes}_int32"), g, to=6)  # onnx.TensorProto.INT32
        if cast.ByteSize() + len(stored) >= g.inits[codes].ByteSize() - narrowed.nbytes:
            continue  # a layer of few channels: the int32 codes are smaller
        g.add_initializer(stored, narrowed)
        new_nodes.append(cast)
        widened = cast.output[0]
        for r in readers:
            r.input[0] = widened
        released.add(codes)
    insert(model.graph, new_nodes)  # they read initializers only: first in the graph
    drop_initializers(model.graph, released)
    return len(biases)


def _bias(g: Graph, dq: Any) -> bool:
    """Whether `dq` dequantizes an int32 initializer that only the bias input of quantized Conv/Gemm nodes reads."""
    if dq.op_type != "DequantizeLinear" or dq.input[0] not in g.inits:
        return False
    if g.inits[dq.input[0]].data_type != 6 or dq.input[1] not in g.inits:  # INT32
        return False
    readers = g.consumers.get(dq.output[0], [])
    if not readers or dq.output[0] in g.outputs:
        return False
    for layer in readers:
        if layer.op_type not in _LAYERS or len(layer.input) < 3 or list(layer.input).index(dq.output[0]) != 2:
            return False
        inputs = [g.op(layer.input[i], "DequantizeLinear") for i in (0, 1)]
        if any(d is None or d.input[1] not in g.inits for d in inputs):
            return False
    scales = {tuple(g.producer[layer.input[i]].input[1] for i in (0, 1)) for layer in readers}
    return len(scales) == 1


def _zeros(g: Graph, name: str) -> bool:
    value = g.initializer(name) if name else None
    return value is not None and not value.any()


def _is_product(g: Graph, scale: str, x_scale: str, w_scale: str) -> bool:
    stored, x, w = g.initializer(scale), g.initializer(x_scale), g.initializer(w_scale)
    if stored.dtype != np.float32 or x.dtype != np.float32 or w.dtype != np.float32:
        return False
    product = x * w
    return product.shape == stored.shape and product.tobytes() == stored.tobytes()


def _narrowed(codes: np.ndarray) -> np.ndarray | None:
    for dtype in _NARROWER:
        info = np.iinfo(dtype)
        if codes.size == 0 or (codes.min() >= info.min and codes.max() <= info.max):
            return codes.astype(dtype)
    return None


def _node(op: str, inputs: list[str], output: str, g: Graph, **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op, inputs, [output], name=g.fresh(output), **attrs)
