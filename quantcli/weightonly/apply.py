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

WEIGHT = "weight_only_weight_"  # a dequantized weight of a linear whose float weight other nodes read too
INPUT_SCALE = "weight_only_input_scale_"


def convert(module: GraphModule, q: QuantizationSection) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Quantize every planned linear of a prepared (and calibrated) module in place.

    Returns (one record per layer for the manifest, the codes: "<i>.codes", "<i>.scale", "<i>.zero").
    """
    records, codes = [], {}
    for index, layer in enumerate(plan.layers(module, q)):
        w = plan.attribute(module, layer.weight_target).detach()
        grid = Grid.of(layer.weights)
        result, chosen = METHODS[layer.weights.method](w, grid, collect.stats_of(module, layer))
        _rewrite(module, layer, result, index)
        codes.update({f"{index}.codes": result.codes, f"{index}.scale": result.scale})
        if result.zero is not None:
            codes[f"{index}.zero"] = result.zero
        records.append(
            {
                "module": layer.module,
                "shape": list(w.shape),
                **layer.weights.model_dump(exclude={"granularity"}),
                **chosen,
            }
        )
    collect.remove(module)
    module.graph.lint()
    module.recompile()
    return records, codes


def _rewrite(module: GraphModule, layer: plan.Layer, result: Quantized, index: int) -> None:
    """The linear reads the dequantized weight (in place where it alone read the float one); AWQ's input scale."""
    node, weight_node = layer.node, layer.node.args[1]
    dequantized = torch.nn.Parameter(result.weight(), requires_grad=False)
    if len(weight_node.users) == 1:
        owner, _, name = weight_node.target.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, name, dequantized)
    else:
        module.register_parameter(f"{WEIGHT}{index}", dequantized)
        with module.graph.inserting_before(node):
            node.replace_input_with(weight_node, module.graph.get_attr(f"{WEIGHT}{index}"))
    if result.input_scale is not None:
        module.register_buffer(f"{INPUT_SCALE}{index}", result.input_scale.clone())
        x = node.args[0]
        with module.graph.inserting_before(node):
            scale = module.graph.get_attr(f"{INPUT_SCALE}{index}")
            divided = module.graph.call_function(torch.ops.aten.div.Tensor, (x, scale))
        divided.meta = {k: v for k, v in node.meta.items() if k == "nn_module_stack"}
        node.replace_input_with(x, divided)


def load(records: list[dict[str, Any]], codes: dict[str, torch.Tensor]) -> list[tuple[dict[str, Any], Quantized]]:
    """The layers `convert` recorded, each with its Quantized result (no input scale: the graph holds it)."""
    out = []
    for index, record in enumerate(records):
        grid = Grid(8 if record["dtype"] == "int8" else 4, record["symmetric"], record["block_size"])
        zero = codes.get(f"{index}.zero")
        out.append((record, Quantized(grid, codes[f"{index}.codes"], codes[f"{index}.scale"], zero)))
    return out


def sizes(records: list[dict[str, Any]]) -> dict[str, int]:
    """Bytes the quantized linears' weights take: as float32, and as stored (codes, float32 scales, zero points)."""
    total = {"float32": 0, "stored": 0}
    for r in records:
        n, k = r["shape"]
        bits = 8 if r["dtype"] == "int8" else 4
        blocks = -(-k // (r["block_size"] or k))
        codes, zeros = -(-n * k * bits // 8), 0 if r["symmetric"] else -(-n * blocks * bits // 8)
        total["float32"] += 4 * n * k
        total["stored"] += codes + 4 * n * blocks + zeros
    return total
