"""Weight-only weights in the ONNX file: int4/int8 codes stored [K, N] behind a DequantizeLinear, the layout
ONNX Runtime fuses with the MatMul (or Gemm with transB=0) it feeds into com.microsoft::MatMulNBits.

The exporter writes each linear's float weight as an initializer feeding a MatMul ([K, N], its transpose
folded), a Transpose of one ([N, K], too large to fold) or a Gemm (transB=1, [N, K]); the weight is
found by its value, the dequantized weight of a quantized layer, which nothing else equals. It is
replaced by DequantizeLinear(codes [K, N] int4/uint4/int8/uint8, scales [K/block, N], zero points
likewise where asymmetric; axis 0, block_size) for blocked weights, or the per-channel form (scales
[N], axis 1). int4 codes are packed two to a byte: the file holds 4 bits a weight. The last block is
shorter where the block does not divide K: DequantizeLinear and MatMulNBits take it as it is, no
padding is stored. Activations stay float: nothing quantizes the MatMul's other input.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from quantcli.errors import ModelError

_ONNX_TYPES = {(4, True): "INT4", (4, False): "UINT4", (8, True): "INT8", (8, False): "UINT8"}


def digest(weight: np.ndarray) -> str:
    """The key a float weight [N, K] is found by in the exported graph."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    return hashlib.sha256(repr(w.shape).encode() + w.tobytes()).hexdigest()


def tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> Any:
    """An integer initializer of `values` (int4/uint4 packed two to a byte, low nibble first)."""
    from onnx import TensorProto, numpy_helper

    if bits == 8:
        return numpy_helper.from_array(values.astype(np.int8 if signed else np.uint8), name)
    nibbles = (values.astype(np.int16).reshape(-1) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    data_type = getattr(TensorProto, _ONNX_TYPES[(bits, signed)])
    return TensorProto(name=name, data_type=data_type, dims=list(values.shape), raw_data=packed.tobytes())


class _Weights:
    """The initializers, producers and consumer counts of a graph, and the float weight [N, K] a node reads."""

    def __init__(self, graph: Any):
        from onnx import numpy_helper

        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}
        self.users: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                self.users[name] = self.users.get(name, 0) + 1
        self.array = lambda name: numpy_helper.to_array(self.initializers[name])

    def weight_of(self, node: Any) -> tuple[np.ndarray, str] | None:
        """(the weight [N, K], the initializer or Transpose output that holds it) of a MatMul/Gemm, else None."""
        from onnx import helper

        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0):
            return None
        source = node.input[1]
        if source in self.initializers:
            b = self.array(source)
            if b.ndim != 2 or b.dtype != np.float32:
                return None
            return (b if attrs.get("transB", 0) else b.T), source
        transpose = self.producers.get(source)
        if (
            node.op_type == "MatMul"
            and transpose is not None
            and transpose.op_type == "Transpose"
            and transpose.input[0] in self.initializers
            and [int(p) for p in helper.get_attribute_value(transpose.attribute[0])] == [1, 0]
        ):
            b = self.array(transpose.input[0])
            return (b, source) if b.dtype == np.float32 else None
        return None


def store(model: Any, layers: list[tuple[dict[str, Any], Any]]) -> int:
    """Replace every layer's float weight in `model` by its codes behind a DequantizeLinear; how many.

    `layers`: (record, Quantized) as quantcli.weightonly.apply.load gives them. A layer whose weight the
    graph does not hold is an error: it would stay float unnoticed.
    """
    from onnx import helper

    wanted = {digest(q.weight().numpy()): (record, q) for record, q in layers}
    weights = _Weights(model.graph)
    new_nodes, done, dropped, bases = [], set(), set(), set()
    for node in list(model.graph.node):
        found = weights.weight_of(node)
        key = digest(found[0]) if found is not None else None
        if key not in wanted:
            continue
        record, q = wanted[key]
        base = f"{record['module']}.weight"
        base = base if base not in bases else f"{base}_{len(bases)}"  # one module called twice: a weight each
        bases.add(base)
        dq_inputs = _initializers(model.graph, base, q)
        blocked = q.grid.block_size is not None
        attrs = {"axis": 0, "block_size": q.grid.block_size} if blocked else {"axis": 1}
        dq = helper.make_node("DequantizeLinear", dq_inputs, [f"{base}_dequantized"], name=f"{base}_dq", **attrs)
        new_nodes.append((node, dq))
        dropped.add(found[1])
        node.input[1] = dq.output[0]
        if node.op_type == "Gemm":
            _set_trans_b(node)
        done.add(key)
    for consumer, dq in new_nodes:  # each DequantizeLinear right before its MatMul, keeping the order topological
        position = list(model.graph.node).index(consumer)
        model.graph.node.insert(position, dq)
    _drop_unused(model.graph, dropped)
    missing = [wanted[k][0]["module"] for k in wanted if k not in done]
    if missing:
        raise ModelError(
            f"weight-only: no MatMul/Gemm of the exported graph reads the quantized weight of {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )
    return len(done)


def _initializers(graph: Any, base: str, q: Any) -> list[str]:
    """Add the codes [K, N], scales and zero points of `q` to the graph; their names, in DequantizeLinear's order."""
    from onnx import numpy_helper

    blocked = q.grid.block_size is not None
    scale = q.scale.numpy().T if blocked else q.scale.numpy()[:, 0]
    graph.initializer.append(tensor(f"{base}_q", q.codes.numpy().T, q.grid.bits, q.grid.symmetric))
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scale, dtype=np.float32), f"{base}_scale"))
    names = [f"{base}_q", f"{base}_scale"]
    if q.zero is not None:
        zero = q.zero.numpy().T if blocked else q.zero.numpy()[:, 0]
        graph.initializer.append(tensor(f"{base}_zero", np.ascontiguousarray(zero), q.grid.bits, q.grid.symmetric))
        names.append(f"{base}_zero")
    return names


def _set_trans_b(node: Any) -> None:
    from onnx import helper

    kept = [a for a in node.attribute if a.name != "transB"]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute("transB", 0)])


def _drop_unused(graph: Any, names: set[str]) -> None:
    """Remove the float weights (and Transposes of them) nothing reads any more, and their value_info."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Transpose" and n.output[0] in names and n.output[0] not in used]
        if not dead:
            break
        for node in dead:
            names.add(node.input[0])
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name not in names or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    info = [v for v in graph.value_info if v.name not in names or v.name in used]
    del graph.value_info[:]
    graph.value_info.extend(info)
