"""convert for weight-only quantization: each planned linear quantized by its method, the graph rewritten.

The converted module is the weight-only model in PyTorch: every quantized linear reads its dequantized
weight (exactly what the ONNX file's DequantizeLinear computes). Where AWQ scaled the input channels of
the linears reading one input (one scale s for all of them), the input is divided by s, folded into the
parameters that made it (an RMS norm's weight, `mul(weight, x)`, a LayerNorm's weight and bias, a gated
MLP's up projection's rows, as the paper's code does). AWQ scales only inputs where that fold exists and
only those linears read the input; the others (an o_proj after grouped-query attention, as llm-awq
leaves it) get its clip search alone, so no Div is added in front of any linear. The codes, scales and
zero points go beside it (`codes`), for export to store as int4/int8 in the ONNX file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

from quantcli.recipe import QuantizationSection
from quantcli.weightonly import collect, plan
from quantcli.weightonly.grid import Grid
from quantcli.weightonly.methods import METHODS, SHARED_INPUT
from quantcli.weightonly.result import Quantized
from quantcli.weightonly.rtn import rtn

WEIGHT = "weight_only_weight_"  # a dequantized weight of a linear whose float weight other nodes read too
INPUT_SCALE = "weight_only_input_scale_"


def convert(module: GraphModule, q: QuantizationSection) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Quantize every planned linear and embedding of a prepared (and calibrated) module in place.

    Returns (one record per layer for the manifest, the codes: "<i>.codes", "<i>.scale", "<i>.zero").
    Records are the linears', then the embeddings' (`kind: embedding`); an embedding sharing its tied
    LM head's quantized weight has no codes of its own, its record names the head (`tied_to`). A linear
    whose input AWQ scaled says where the scale went (`input_scale`: `folded_into` the parameters).
    """
    tables = plan.embeddings(module, q)  # planned before the linears' rewrite moves a tied head's weight
    layers = plan.layers(module, q)
    targets = [layer.weight_target for layer in layers]  # before the rewrite gives a shared weight its own copy
    found: dict[int, tuple[list[int], Quantized, dict[str, Any]]] = {}
    codes: dict[str, torch.Tensor] = {}
    for group in reversed(_groups(layers)):  # a linear's input scale may fold into the rows of one before it
        ws = [layers[index].weight(module) for index in group]
        grids = [Grid.of(layers[index].weights) for index in group]
        method, first = layers[group[0]].weights.method, layers[group[0]]
        # AWQ scales an input only where 1/s folds into the op that made it (llm-awq skips the others too)
        folds = _fold_targets(module, first.input, {layers[i].node for i in group}, ws[0].shape[1])
        scale = {"scale": bool(folds)} if method in SHARED_INPUT else {}
        results = METHODS[method](ws, grids, collect.stats_of(module, first), **scale)
        scaling = _scale_input(module, folds, results[0][0].input_scale)
        for index, w, (result, chosen) in zip(group, ws, results):
            _rewrite(module, layers[index], result, index)
            _add_codes(codes, index, result)
            found[index] = (list(w.shape), result, {**chosen, **({"input_scale": scaling} if scaling else {})})
    records, heads = [], {}
    for index, layer in enumerate(layers):
        shape, result, chosen = found[index]
        heads.setdefault(targets[index], (index, layer, result))
        setting = layer.weights.model_dump(exclude={"granularity"})
        records.append(_record("linear", layer.module, shape, setting, chosen))
    for table in tables:
        records.append(_embedding(module, table, heads.get(table.weight_target), len(records), codes))
    collect.remove(module)
    module.graph.lint()
    module.recompile()
    return records, codes


def _groups(layers: list[plan.Layer]) -> list[list[int]]:
    """The layers' indices, those a method quantizes together (AWQ's reading one input) in one group."""
    groups: dict[tuple, list[int]] = {}
    for index, layer in enumerate(layers):
        method = layer.weights.method
        groups.setdefault((method, layer.input) if method in SHARED_INPUT else (index,), []).append(index)
    return list(groups.values())


def _embedding(module: GraphModule, table: plan.Embedding, head: tuple | None, index: int, codes: dict) -> dict:
    """An embedding's record: it reads its tied head's weight where both have one setting, else its own table
    rounded to nearest (no data says which rows matter)."""
    w = plan.attribute(module, table.weight_target).detach()
    setting = table.weights.model_dump(exclude={"granularity"})
    if head is not None and head[1].weights == table.weights and not head[1].transposed:
        _read_head(module, table, *head)
        return _record("embedding", table.module, list(w.shape), setting, {"tied_to": head[0]})
    result = rtn(w, Grid.of(table.weights))
    _read_table(module, table, result, index)
    _add_codes(codes, index, result)
    return _record("embedding", table.module, list(w.shape), {**setting, "method": "rtn"}, {})


def _record(kind: str, name: str, shape: list[int], setting: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "module": name, "shape": shape, **setting, **chosen}


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
    (the weight holds W * s; the norm before the head took 1/s), its rows are divided by the same scales (buffer
    INPUT_SCALE<head's index>)."""
    node, float_table = table.node, table.node.args[0]
    with module.graph.inserting_before(node):
        node.replace_input_with(float_table, module.graph.get_attr(head.weight_target))
    if not float_table.users:
        module.graph.erase_node(float_table)
    if result.input_scale is None:
        return
    module.register_buffer(f"{INPUT_SCALE}{index}", result.input_scale.clone())
    with module.graph.inserting_after(node):
        scale = module.graph.get_attr(f"{INPUT_SCALE}{index}")
    with module.graph.inserting_after(scale):
        divided = module.graph.call_function(torch.ops.aten.div.Tensor, (node, scale))
    divided.meta = {k: v for k, v in node.meta.items() if k == "nn_module_stack"}
    node.replace_all_uses_with(divided, delete_user_cb=lambda user: user is not divided)


def _rewrite(module: GraphModule, layer: plan.Layer, result: Quantized, index: int) -> None:
    """The linear reads the dequantized weight (in place where it alone read the float one)."""
    node, weight_node = layer.node, layer.weight_node
    weight = result.weight().T.contiguous() if layer.transposed else result.weight()  # as the layer stores it
    dequantized = torch.nn.Parameter(weight, requires_grad=False)
    if len(weight_node.users) == 1:
        owner, _, name = weight_node.target.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, name, dequantized)
        return
    module.register_parameter(f"{WEIGHT}{index}", dequantized)
    with module.graph.inserting_before(node):
        node.replace_input_with(weight_node, module.graph.get_attr(f"{WEIGHT}{index}"))


def _scale_input(module: GraphModule, params: list[torch.fx.Node], s: torch.Tensor | None) -> dict | None:
    """Divide the parameters that make the input of AWQ's linears (`_fold_targets`: only they read it) by s, along
    their first axis; where the scale went (None for no scale)."""
    if s is None:
        return None
    for param in params:
        owner, _, name = param.target.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        value = getattr(holder, name).detach()
        divided = value / s.reshape(-1, *[1] * (value.dim() - 1)).to(value.dtype)
        setattr(holder, name, torch.nn.Parameter(divided, requires_grad=False))
    return {"folded_into": [param.target for param in params]}


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default)  # GPT-2's Conv1D reads x.view(-1, K)
MUL, LAYER_NORM = torch.ops.aten.mul.Tensor, torch.ops.aten.layer_norm.default


def _fold_targets(module: GraphModule, x: torch.fx.Node, readers: set[torch.fx.Node], k: int) -> list[torch.fx.Node]:
    """The parameters whose product over the last axis is `x`, where nothing but `readers` reads it, so that 1/s
    folds into them: mul(weight [K], h) (an RMS norm's last step), layer_norm(h, [K], weight, bias),
    act(gate(h)) * up(h) (a gated MLP: the rows of up's weight and bias, not yet quantized: convert goes from the
    last linear back) or a linear read by one linear alone (its rows), seen through the statistics collector and
    views that keep the last axis; [] if none."""
    node = x
    while set(node.users) == readers:
        if node.op == "call_module" and str(node.target).startswith(collect.PREFIX):
            readers, node = {node}, node.args[0]
        elif _keeps_last_axis(node, k):
            readers, node = {node}, node.args[0]
        else:
            break
    if set(node.users) != readers or node.op != "call_function":
        return []
    if node.target is plan.LINEAR and len(readers) == 1:  # a linear right before: its rows (llm-awq's fc -> fc)
        return _own_rows(module, node, next(iter(readers)), k)
    if node.target is MUL and len(node.args) == 2 and all(isinstance(a, torch.fx.Node) for a in node.args):
        vectors = [a for a in node.args if _own(module, a, node, (k,))]
        rows = [found for a in node.args if (found := _own_rows(module, a, node, k))]
        return vectors[:1] or (rows[0] if rows else [])
    if node.target is LAYER_NORM and list(node.args[1]) == [k] and len(node.args) >= 4 and node.args[2] is not None:
        params = [a for a in node.args[2:4] if a is not None]
        return params if all(_own(module, a, node, (k,)) for a in params) else []
    return []


def _own_rows(module: GraphModule, a: torch.fx.Node, user: torch.fx.Node, k: int) -> list[torch.fx.Node]:
    """[weight, bias] (or [weight]) of `a` where it is an aten.linear with k outputs that only `user` reads, whose
    parameters nothing else reads; else []."""
    if a.op != "call_function" or a.target is not plan.LINEAR or set(a.users) != {user} or not plan.is_linear(a):
        return []
    weight, bias = a.args[1], a.args[2] if len(a.args) > 2 else None
    if not _own(module, weight, a, (k, plan.attribute(module, weight.target).shape[1])):
        return []
    if bias is not None and not _own(module, bias, a, (k,)):
        return []
    return [weight] + ([bias] if bias is not None else [])


def _keeps_last_axis(node: torch.fx.Node, k: int) -> bool:
    """A view to [..., k] or a slice along another axis (an LM head's hidden_states[:, -n:, :]): each of its
    output's rows along the last axis is one of its input's."""
    if node.op != "call_function":
        return False
    if node.target in _VIEWS:
        return list(node.args[1])[-1:] == [k]
    if node.target is torch.ops.aten.slice.Tensor:
        val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        dim = node.args[1] if len(node.args) > 1 else 0
        return val is not None and val.shape[-1] == k and dim % val.dim() != val.dim() - 1
    return False


def _own(module: GraphModule, a: Any, user: torch.fx.Node, shape: tuple[int, ...]) -> bool:
    """Whether `a` is a parameter of `shape` that only `user` reads (no other node, no other name of it)."""
    if not isinstance(a, torch.fx.Node) or a.op != "get_attr" or set(a.users) != {user}:
        return False
    value = plan.attribute(module, a.target)
    if not isinstance(value, torch.nn.Parameter) or tuple(value.shape) != shape:
        return False
    readers = [n for n in module.graph.nodes if n.op == "get_attr" and n.target == a.target]
    shared = [p for _, p in module.named_parameters(remove_duplicate=False) if p is value]
    return len(readers) == 1 and len(shared) == 1


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
