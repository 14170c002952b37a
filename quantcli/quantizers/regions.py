"""Regions a model runs under a grad mode or a disabled autocast, inlined before annotation.

torch.export keeps `with torch.no_grad():`, `torch.set_grad_enabled(...)` and `with torch.autocast(...,
enabled=False):` blocks of a model's forward as higher-order ops (`wrap_with_set_grad_enabled`,
`wrap_with_autocast`) calling a subgraph of their own. The quantizer annotates the module's graph, not
those subgraphs: every op inside stayed float. EfficientViT's linear attention, for one, computes its
two matmuls under a disabled autocast, which left 8 of its 60 matmuls float in ORT.

For an inference graph in float32 such a region computes what its body computes anywhere: grad modes do
nothing in inference (QAT keeps them), and a disabled autocast runs each op at its own dtype, as outside. Its body is
copied into the graph in the call's place (its casts included), so the quantizer sees those ops like
any other. An enabled autocast changes dtypes and stays as it is.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from quantcli.quantizers.graphpass import rewrite_each

_SET_GRAD = "wrap_with_set_grad_enabled"  # (enabled, subgraph, *operands)
_AUTOCAST = "wrap_with_autocast"  # (device_type, dtype, enabled, cache_enabled, subgraph, *operands)


def _neutral_region(node: Node, grad_modes: bool) -> tuple[Node, tuple] | None:
    """(the subgraph's get_attr node, the operands) of a region call that inlines without a change, else None."""
    if node.op != "call_function":
        return None
    name = getattr(node.target, "__name__", "")
    if name == _SET_GRAD and grad_modes:
        return node.args[1], node.args[2:]
    if name == _AUTOCAST and node.args[2] is False:
        return node.args[4], node.args[5:]
    return None


def inline_regions(model: GraphModule, grad_modes: bool = True) -> int:
    """Copy the body of every disabled-autocast region and, with `grad_modes` (not for training: there a
    no_grad block stops gradients), every grad-mode region into `model`'s graph; how many, nested ones included."""
    total = 0
    while done := rewrite_each(model, lambda node, _: _inline(model, node, grad_modes)):
        total += done  # a nested region's call, copied in by its parent's inlining, is inlined next round
    return total


def _inline(model: GraphModule, call: Node, grad_modes: bool) -> bool:
    region = _neutral_region(call, grad_modes)
    if region is None or any(u.op != "call_function" or u.target is not operator.getitem for u in call.users):
        return False
    attr, operands = region
    body: GraphModule = model.get_submodule(attr.target)
    env: dict[Node, object] = {}
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, operands))
    results = None
    with model.graph.inserting_before(call):
        for node in body.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                results = node.args[0]
                break
            copied = model.graph.node_copy(node, lambda n: env[n])
            if node.op == "get_attr":  # a nested region's subgraph (or a constant): moved into the parent
                copied.target = _free_name(model, f"{attr.target}_{node.target}")
                setattr(model, copied.target, getattr(body, node.target))
            env[node] = copied
    outputs = torch.fx.node.map_arg(results, lambda n: env[n])
    for user in list(call.users):  # the region's results are read one by one
        user.replace_all_uses_with(outputs[user.args[1]])
        model.graph.erase_node(user)
    model.graph.erase_node(call)
    if not attr.users:
        model.graph.erase_node(attr)
        delattr(model, attr.target)
    return True


def _free_name(model: GraphModule, base: str) -> str:
    name, i = base.replace(".", "_"), 0
    while hasattr(model, name):
        i += 1
        name = f"{base.replace('.', '_')}_{i}"
    return name
