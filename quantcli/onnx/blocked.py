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
import os.path
from typing import Any

import numpy as np

from quantcli.errors import ModelError
from quantcli.onnx.graph import Graph, drop_initializers, insert

ACCURACY_LEVEL = 4  # what ORT gives the MatMulNBits it fuses: the input quantized to int8 per block
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


class _Weights(Graph):
    """The graph's index (quantcli.onnx.graph), and the float weight [N, K] a node reads."""

    def weight_of(self, node: Any) -> tuple[np.ndarray, str] | None:
        """(the weight [N, K], the initializer or Transpose output that holds it) of a MatMul/Gemm, else None."""
        from onnx import helper

        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0):
            return None
        source = node.input[1]
        if source in self.inits:
            b = self.initializer(source)
            if b.ndim != 2 or b.dtype != np.float32:
                return None
            return (b if attrs.get("transB", 0) else b.T), source
        transpose = self.producer.get(source)
        if (
            node.op_type == "MatMul"
            and transpose is not None
            and transpose.op_type == "Transpose"
            and transpose.input[0] in self.inits
            and [int(p) for p in helper.get_attribute_value(transpose.attribute[0])] == [1, 0]
        ):
            b = self.initializer(transpose.input[0])
            return (b, source) if b.dtype == np.float32 else None
        return None


def store(model: Any, layers: list[tuple[dict[str, Any], Any]], *, runtime_form: bool = False) -> int:
    """Replace every layer's float weight in `model` by its codes; how many linears.

    `layers`: (record, Quantized) as quantcli.weightonly.apply.load gives them. A linear's codes go
    behind a DequantizeLinear; an embedding's Gather becomes a GatherBlockQuantized; a linear whose
    codes an embedding shares is written as MatMulNBits, its packed weight read by both. A layer whose
    weight the graph does not hold is an error: it would stay float unnoticed.

    `runtime_form` writes every blocked linear as MatMulNBits, the node ORT would fuse its DequantizeLinear and
    MatMul into when it loads the model: for a model only ORT runs (the decoder onnxruntime-genai loads), which
    then loads without that fusion and without a second copy of the codes in memory while it runs. Linears
    that read one input on one grid (a gated MLP's gate and up projections) are then one MatMulNBits.
    """
    linears = [(i, r, q) for i, (r, q) in enumerate(layers) if r.get("kind", "linear") == "linear"]
    tables = [(i, r, q) for i, (r, q) in enumerate(layers) if r.get("kind") == "embedding"]
    shared = {r["tied_to"] for _, r, _ in tables if "tied_to" in r}
    wanted = {digest(q.weight().numpy()): (index, record, q) for index, record, q in linears}
    merged, unread = _packed_attention_inputs(model, wanted, runtime_form)
    weights = _Weights(model.graph)
    packed: dict[int, tuple[str, ...]] = {}
    unmerged = {key: entry for key, entry in wanted.items() if entry[0] not in merged}
    done, dropped = _store_linears(model, weights, unmerged, shared, packed, runtime_form)
    done += merged
    dropped |= unread
    done += _store_tables(model, weights, tables, packed, dropped)
    _drop_unused(model.graph, dropped)
    if runtime_form:
        _one_call_per_input(model)
    missing = [r["module"] for i, r, _ in linears + tables if i not in done]
    if missing:
        raise ModelError(
            f"weight-only: no MatMul/Gemm/Gather of the exported graph reads the quantized weight of "
            f"{', '.join(missing[:3])}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )
    return len(linears)


def _packed_attention_inputs(
    model: Any, wanted: dict[str, tuple[int, dict, Any]], runtime_form: bool
) -> tuple[list[int], set[str]]:
    """One MatMul for the query, key and value projections of each GroupQueryAttention that reads three MatMuls of
    one input with weights on one grid, behind one DequantizeLinear of their codes, its output the packed input
    the node takes (key and value left empty): at batch 1 one kernel call instead of three. `wanted`: the
    linears by the digest of their weight; (the indices stored, the float weights no longer read)."""
    from quantcli.weightonly.result import Quantized

    weights = _Weights(model.graph)
    merged: list[int] = []
    unread: set[str] = set()
    for gqa in [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]:
        projections = [weights.producer.get(name) for name in gqa.input[:3]]
        if len(projections) < 3 or any(p is None or p.op_type != "MatMul" for p in projections):
            continue
        found = [weights.weight_of(p) for p in projections]
        if any(f is None for f in found) or len({p.input[0] for p in projections}) != 1:
            continue
        parts = [wanted.get(digest(w)) for w, _ in found]
        if any(part is None for part in parts) or any(len(weights.consumers[p.output[0]]) != 1 for p in projections):
            continue
        qs = [q for _, _, q in parts]
        one_grid = all(q.grid == qs[0].grid and (q.zero is None) == (qs[0].zero is None) for q in qs)
        if not one_grid or any(q.input_scale is not None for q in qs):
            continue
        combined = Quantized(
            qs[0].grid,
            _concatenated([q.codes for q in qs]),
            _concatenated([q.scale for q in qs]),
            _concatenated([q.zero for q in qs]) if qs[0].zero is not None else None,
        )
        first = projections[0]
        module = parts[0][1]["module"].rsplit(".", 1)[0]
        if _in_runtime_form(runtime_form, combined):
            _matmul_nbits(model, first, f"{module}.qkv_proj.weight", combined)
        else:
            dq = _dequantized(model.graph, first, f"{module}.qkv_proj.weight", combined)
            insert(model.graph, dq, before=first)
        for p in projections[1:]:
            model.graph.node.remove(p)
        gqa.input[1] = gqa.input[2] = ""
        unread |= {source for _, source in found}
        merged += [index for index, _, _ in parts]
    return merged, unread


def _concatenated(tensors: list) -> Any:
    import torch

    return torch.cat(tensors, dim=0)


def _store_linears(
    model: Any,
    weights: _Weights,
    wanted: dict[str, tuple[int, dict, Any]],
    shared: set[int],
    packed: dict[int, tuple[str, ...]],
    runtime_form: bool,
) -> tuple[list[int], set[str]]:
    """DequantizeLinear (or MatMulNBits where shared) in front of each linear, found by the digest of its weight
    (`wanted`); (the indices done, weights dropped)."""
    new_nodes, done, dropped, bases = [], [], set(), set()
    for node in list(model.graph.node):
        found = weights.weight_of(node)
        key = digest(found[0]) if found is not None else None
        if key not in wanted:
            continue
        index, record, q = wanted[key]
        base = f"{record['module']}.weight"
        base = base if base not in bases else f"{base}_{len(bases)}"  # one module called twice: a weight each
        bases.add(base)
        dropped.add(found[1])
        done.append(index)
        if index in shared or _in_runtime_form(runtime_form, q):
            packed[index] = _matmul_nbits(model, node, base, q)
            continue
        new_nodes.append((node, _dequantized(model.graph, node, base, q)))
    for consumer, dq in new_nodes:  # each DequantizeLinear right before its MatMul, keeping the order topological
        insert(model.graph, dq, before=consumer)
    return done, dropped


def _one_call_per_input(model: Any) -> int:
    """MatMulNBits nodes that read one input with the same K, grid and inputs, their codes read by nothing else,
    as one MatMulNBits over their rows and a Split of its output: at batch 1 one kernel call where there were
    several (SmolLM2-135M's int4 decode, gate and up merged: 1.00-1.02x the speed on 1 and 2 threads). Each
    output column is computed as before, from the same codes, scales and input. How many merged."""
    from onnx import helper

    g = Graph(model.graph)
    groups: dict[tuple, list[Any]] = {}
    for node in model.graph.node:
        own = all(len(g.consumers.get(name, [])) == 1 and name in g.inits for name in node.input[1:] if name)
        if node.op_type != "MatMulNBits" or not own or len(node.input) > 4 or "" in node.input[1:]:
            continue  # a bias, g_idx or shared codes (a tied head's) keep their node
        attrs = tuple(sorted((a.name, a.i) for a in node.attribute if a.name != "N"))
        groups.setdefault((node.input[0], attrs, len(node.input)), []).append(node)
    merged, released = 0, set()
    for nodes in (group for group in groups.values() if len(group) > 1):
        n = [next(a.i for a in node.attribute if a.name == "N") for node in nodes]
        prefix = _common_prefix([node.input[1] for node in nodes])
        module = prefix + "_".join(node.input[1][len(prefix) :].split(".")[0] for node in nodes)  # ...gate_proj_up_proj
        inputs = [nodes[0].input[0]]
        for k in range(1, len(nodes[0].input)):
            parts = [g.initializer(node.input[k]) for node in nodes]
            parts = [p.reshape(rows, -1) if p.ndim == 1 else p for p, rows in zip(parts, n)]  # scales [N * blocks]
            name = g.fresh(f"{module}.{nodes[0].input[k].rsplit('.', 1)[-1]}")  # .weight_packed, .weight_scales
            inputs.append(g.add_initializer(name, np.concatenate(parts, axis=0)))
        attrs = {a.name: a.i for a in nodes[0].attribute}
        joined = g.fresh(f"{module}_output")
        one = helper.make_node(
            "MatMulNBits",
            inputs,
            [joined],
            name=g.fresh(module),
            domain="com.microsoft",
            **{**attrs, "N": sum(n)},
        )
        sizes = g.add_initializer(g.fresh(f"{module}.sizes"), np.array(n, dtype=np.int64))
        split = helper.make_node(
            "Split", [joined, sizes], [node.output[0] for node in nodes], axis=-1, name=g.fresh(f"{module}_split")
        )
        one.metadata_props.extend(nodes[0].metadata_props)
        released |= {name for node in nodes for name in node.input[1:]}
        insert(model.graph, [one, split], replacing=nodes)
        merged += 1
    _drop_unused(model.graph, released)
    return merged


def _common_prefix(names: list[str]) -> str:
    """The names' common start, up to its last dot (`model.layers.0.mlp.`)."""
    common = os.path.commonprefix(names)
    return common[: common.rfind(".") + 1]


def _in_runtime_form(runtime_form: bool, q: Any) -> bool:
    """Whether q's linear is written as MatMulNBits: in the runtime form, a blocked one (a per-channel weight's
    one scale a row has no MatMulNBits block size: ORT fuses its DequantizeLinear itself)."""
    return runtime_form and q.grid.block_size is not None


def _dequantized(graph: Any, node: Any, base: str, q: Any) -> Any:
    """The DequantizeLinear of q's codes (added to `graph` as initializers named after `base`) that the MatMul/Gemm
    `node` now reads as its weight; the caller places it before `node`."""
    from onnx import helper

    blocked = q.grid.block_size is not None
    attrs = {"axis": 0, "block_size": q.grid.block_size} if blocked else {"axis": 1}
    dq_inputs = _initializers(graph, base, q)
    dq = helper.make_node("DequantizeLinear", dq_inputs, [f"{base}_dequantized"], name=f"{base}_dq", **attrs)
    node.input[1] = dq.output[0]
    if node.op_type == "Gemm":
        _set_trans_b(node)
    return dq


def _store_tables(model: Any, weights: _Weights, tables: list, packed: dict[int, tuple[str, ...]], dropped: set[str]):
    """Each embedding's Gather as a GatherBlockQuantized of its own packed table or of its head's; the indices done."""
    from onnx import helper

    wanted = {digest(q.weight().numpy()): (index, record, q) for index, record, q in tables}
    done = []
    for node in list(model.graph.node):
        table = node.input[0] if node.op_type == "Gather" and node.input else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if table not in weights.inits or attrs.get("axis", 0) != 0:
            continue
        array = weights.initializer(table)
        key = digest(array) if array.ndim == 2 and array.dtype == np.float32 else None
        if key not in wanted:
            continue
        index, record, q = wanted[key]
        n, k = q.codes.shape
        if "tied_to" in record:  # the head's MatMulNBits weight [N, blocks, blob] read as rows [N, blocks * blob]
            b, scale, zero = packed[record["tied_to"]]
            rows = _constant(model.graph, f"{record['module']}.weight_rows", [n, -1])
            data = f"{record['module']}.weight_packed"
            reshape = helper.make_node("Reshape", [b, rows], [data], name=f"{record['module']}.weight_reshape")
            insert(model.graph, reshape, before=node)
        else:
            data, scale, zero = _nbits_initializers(model.graph, f"{record['module']}.weight", q, blobs=False)
        gathered = node.output[0] if k % q.grid.block(k) == 0 else f"{node.output[0]}_padded"
        gather = helper.make_node(
            "GatherBlockQuantized",
            [data, node.input[1], scale] + ([zero] if zero else []),
            [gathered],
            name=node.name,
            domain="com.microsoft",
            bits=q.grid.bits,
            block_size=q.grid.block(k),
            gather_axis=0,
            quantize_axis=1,
        )
        insert(model.graph, gather, before=node)
        if gathered != node.output[0]:  # the padding of the last block sliced off
            bounds = [_constant(model.graph, f"{record['module']}.weight_{w}", [v]) for w, v in (("0", 0), ("k", k))]
            last = _constant(model.graph, f"{record['module']}.weight_axis", [-1])
            insert(model.graph, helper.make_node("Slice", [gathered, *bounds, last], [node.output[0]]), before=node)
        model.graph.node.remove(node)
        dropped.add(table)
        done.append(index)
    if done:
        _use_microsoft_domain(model)
    return done


def _constant(graph: Any, name: str, values: list[int]) -> str:
    from onnx import numpy_helper

    if name not in {t.name for t in graph.initializer}:
        graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
    return name


def _use_microsoft_domain(model: Any) -> None:
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _nbits_initializers(graph: Any, base: str, q: Any, *, blobs: bool) -> tuple[str, str, str]:
    """Add q's codes in MatMulNBits' layout (rows [N, blocks, blob] when `blobs`, else [N, blocks * blob]: uint8,
    offset by the grid's default zero point where symmetric, two 4-bit codes a byte, the last block padded),
    scales [N, blocks] and packed zero points; their names ("" for no zero point)."""
    from onnx import numpy_helper

    n, k = q.codes.shape
    size, count = q.grid.block(k), q.grid.blocks(k)
    offset = 0 if q.zero is not None else 2 ** (q.grid.bits - 1)
    codes = q.codes.numpy().astype(np.int16) + offset
    pad = np.repeat(q.zero.numpy()[:, -1:], count * size - k, 1) if q.zero is not None else offset
    codes = np.concatenate([codes, np.broadcast_to(pad, (n, count * size - k)).astype(np.int16)], 1).astype(np.uint8)
    data = _pack_rows(codes, q.grid.bits)
    data = data.reshape(n, count, -1) if blobs else data
    graph.initializer.append(numpy_helper.from_array(data, f"{base}_packed"))
    graph.initializer.append(numpy_helper.from_array(q.scale.numpy().astype(np.float32), f"{base}_scales"))
    if q.zero is None:
        return f"{base}_packed", f"{base}_scales", ""
    graph.initializer.append(numpy_helper.from_array(_pack_rows(q.zero.numpy(), q.grid.bits), f"{base}_zero_points"))
    return f"{base}_packed", f"{base}_scales", f"{base}_zero_points"


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [N, M] as bytes along each row: as it is for 8 bits; for 4, two a byte, low nibble first."""
    values = values.astype(np.uint8)
    if bits == 8:
        return np.ascontiguousarray(values)
    values = np.pad(values, ((0, 0), (0, values.shape[1] % 2)))
    return np.ascontiguousarray(values[:, 0::2] | (values[:, 1::2] << 4))


def _matmul_nbits(model: Any, node: Any, base: str, q: Any) -> tuple[str, str, str]:
    """Rewrite a MatMul/Gemm as com.microsoft::MatMulNBits over q's packed codes; (weight, scales, zero points)."""
    from onnx import helper

    n, k = q.codes.shape
    names = _nbits_initializers(model.graph, base, q, blobs=True)
    bias = [node.input[2]] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else []
    inputs = [node.input[0], *names] + ([""] + bias if bias else [])  # g_idx unused
    while inputs[-1] == "":
        inputs.pop()
    del node.input[:]
    node.input.extend(inputs)
    node.op_type, node.domain = "MatMulNBits", "com.microsoft"
    del node.attribute[:]
    attrs = {"K": k, "N": n, "bits": q.grid.bits, "block_size": q.grid.block(k), "accuracy_level": ACCURACY_LEVEL}
    node.attribute.extend(helper.make_attribute(key, value) for key, value in attrs.items())
    _use_microsoft_domain(model)
    return names


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
    drop_initializers(graph, names)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    info = [v for v in graph.value_info if v.name not in names or v.name in used]
    del graph.value_info[:]
    graph.value_info.extend(info)
