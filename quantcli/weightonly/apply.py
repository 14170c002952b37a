"""convert for weight-only quantization: each planned linear quantized by its method, the graph rewritten.

The converted module is the weight-only model in PyTorch: every quantized linear reads its dequantized
weight (exactly what the ONNX file's DequantizeLinear computes) and, where AWQ scaled its input
channels, divides its input by those scales first. The codes, scales and zero points go beside it
(`codes`), for export to store as int4/int8 in the ONNX file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

from quantcli.recipe import QuantizationSection
from quantcli.weightonly import collect, plan
from quantcli.weightonly.grid import Grid
from quantcli.weightonly.methods import METHODS
from quantcli.weightonly.result import Quantized
from quantcli.weightonly.rtn import rtn

WEIGHT = "weight_only_weight_"  # a dequantized weight of a linear whose float weight other nodes read too
INPUT_SCALE = "weight_only_input_scale_"


def convert(module: GraphModule, q: QuantizationSection) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Quantize every planned linear and embedding of a prepared (and calibrated) module in place.

    Returns (one record per layer for the manifest, the codes: "<i>.codes", "<i>.scale", "<i>.zero").
    Records are the linears', then the embeddings' (`kind: embedding`); an embedding sharing its tied
    LM head's quantized weight has no codes of its own, its record names the head (`tied_to`).
    """
    records, codes = [], {}
    tables = plan.embeddings(module, q)  # planned before the linears' rewrite moves a tied head's weight
    heads: dict[str, tuple[int, plan.Layer, Quantized]] = {}
    for index, layer in enumerate(plan.layers(module, q)):
        target, w = layer.weight_target, layer.weight(module)
        grid = Grid.of(layer.weights)
        result, chosen = METHODS[layer.weights.method](w, grid, collect.stats_of(module, layer))
        _rewrite(module, layer, result, index)
        _add_codes(codes, index, result)
        heads.setdefault(target, (index, layer, result))
        records.append(_record("linear", layer.module, w, layer.weights.model_dump(exclude={"granularity"}), chosen))
    for table in tables:
        records.append(_embedding(module, table, heads.get(table.weight_target), len(records), codes))
    collect.remove(module)
    module.graph.lint()
    module.recompile()
    return records, codes


def _embedding(module: GraphModule, table: plan.Embedding, head: tuple | None, index: int, codes: dict) -> dict:
    """An embedding's record: it reads its tied head's weight where both have one setting, else its own table
    rounded to nearest (no data says which rows matter)."""
    w = plan.attribute(module, table.weight_target).detach()
    setting = table.weights.model_dump(exclude={"granularity"})
    if head is not None and head[1].weights == table.weights and not head[1].transposed:
        _read_head(module, table, *head)
        return _record("embedding", table.module, w, setting, {"tied_to": head[0]})
    result = rtn(w, Grid.of(table.weights))
    _read_table(module, table, result, index)
    _add_codes(codes, index, result)
    return _record("embedding", table.module, w, {**setting, "method": "rtn"}, {})


def _record(kind: str, name: str, w: torch.Tensor, setting: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "module": name, "shape": list(w.shape), **setting, **chosen}


def _add_codes(codes: dict[str, torch.Tensor], index: int, result: Quantized) -> None:
    codes.update({f"{index}.codes": result.codes, f"{index}.scale": result.scale})
    if result.zero is not None:
        codes[f"{index}.zero"] = result.zero


def _read_table(module: GraphModule, table: plan.Embedding, result: Quantized, index: int) -> None:
    """The embedding reads its own dequantized table (in place where it alone read the float one)."""
    weight_node = table.node.args[0]
    dequantized = torch.nn.Parameter(result.weight(), requires_grad=False)
    if len(weight_node.users) == 1:
        owner, _, name = weight_node.target.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, name, dequantized)
        return
    module.register_parameter(f"{WEIGHT}{index}", dequantized)
    with module.graph.inserting_before(table.node):
        table.node.replace_input_with(weight_node, module.graph.get_attr(f"{WEIGHT}{index}"))


def _read_head(module: GraphModule, table: plan.Embedding, index: int, head: plan.Layer, result: Quantized) -> None:
    """The embedding reads its tied head's dequantized weight; where AWQ scaled the head's input channels
    (the weight holds W * s), its rows are divided by the same scales."""
    node, float_table = table.node, table.node.args[0]
    with module.graph.inserting_before(node):
        node.replace_input_with(float_table, module.graph.get_attr(head.weight_target))
    if not float_table.users:
        module.graph.erase_node(float_table)
    if result.input_scale is None:
        return
    with module.graph.inserting_after(node):
        scale = module.graph.get_attr(f"{INPUT_SCALE}{index}")
    with module.graph.inserting_after(scale):
        divided = module.graph.call_function(torch.ops.aten.div.Tensor, (node, scale))
    divided.meta = {k: v for k, v in node.meta.items() if k == "nn_module_stack"}
    node.replace_all_uses_with(divided, delete_user_cb=lambda user: user is not divided)


def _rewrite(module: GraphModule, layer: plan.Layer, result: Quantized, index: int) -> None:
    """The linear reads the dequantized weight (in place where it alone read the float one); AWQ's input scale."""
    node, weight_node = layer.node, layer.weight_node
    weight = result.weight().T.contiguous() if layer.transposed else result.weight()  # as the layer stores it
    dequantized = torch.nn.Parameter(weight, requires_grad=False)
    if len(weight_node.users) == 1:
        owner, _, name = weight_node.target.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, name, dequantized)
    else:
        module.register_parameter(f"{WEIGHT}{index}", dequantized)
        with module.graph.inserting_before(node):
            node.replace_input_with(weight_node, module.graph.get_attr(f"{WEIGHT}{index}"))
    if result.input_scale is not None:
        module.register_buffer(f"{INPUT_SCALE}{index}", result.input_scale.clone())
        x = layer.input
        with module.graph.inserting_before(node):
            scale = module.graph.get_attr(f"{INPUT_SCALE}{index}")
            divided = module.graph.call_function(torch.ops.aten.div.Tensor, (x, scale))
        divided.meta = {k: v for k, v in node.meta.items() if k == "nn_module_stack"}
        node.replace_input_with(x, divided)


def load(records: list[dict[str, Any]], codes: dict[str, torch.Tensor]) -> list[tuple[dict[str, Any], Quantized]]:
    """The layers `convert` recorded, each with its Quantized result (no input scale: the graph holds it);
    an embedding tied to a head gets the head's."""
    out: list[tuple[dict[str, Any], Quantized]] = []
    for index, record in enumerate(records):
        if "tied_to" in record:
            out.append((record, out[record["tied_to"]][1]))
            continue
        grid = Grid(8 if record["dtype"] == "int8" else 4, record["symmetric"], record["block_size"])
        zero = codes.get(f"{index}.zero")
        out.append((record, Quantized(grid, codes[f"{index}.codes"], codes[f"{index}.scale"], zero)))
    return out


def kind(record: dict[str, Any]) -> str:
    return record.get("kind", "linear")


def sizes(records: list[dict[str, Any]], of: str = "linear") -> dict[str, int]:
    """Bytes the quantized weights of one kind (linear, embedding) take: as float32, and as stored (codes,
    float32 scales, zero points; nothing more for an embedding sharing its head's)."""
    total = {"float32": 0, "stored": 0}
    for r in records:
        if kind(r) != of:
            continue
        n, k = r["shape"]
        bits = 8 if r["dtype"] == "int8" else 4
        blocks = -(-k // (r["block_size"] or k))
        codes, zeros = -(-n * k * bits // 8), 0 if r["symmetric"] else -(-n * blocks * bits // 8)
        total["float32"] += 4 * n * k
        total["stored"] += 0 if "tied_to" in r else codes + 4 * n * blocks + zeros
    return total
