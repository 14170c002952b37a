"""What calibrate collects for GPTQ and AWQ: each quantized linear's input statistics, in the graph.

An `InputStats` module is inserted in front of the linears that read one input (q, k and v share
theirs) and passes it through unchanged while it accumulates sum(x x^T) over every row of every
batch (the input Hessian GPTQ needs, and AWQ measures its output error with) and, for AWQ, sum(|x|)
per input channel. Its memory is one K x K matrix per distinct input, whatever the amount of data.
The sums are buffers: the calibrated artifact's state holds them, a new process restores them with
the module (quantcli.stages.base.restore_prepared).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from quantcli.quantizers.names import WEIGHT_METHODS_WITH_DATA
from quantcli.weightonly.plan import Layer

PREFIX = "weight_only_stats_"


class InputStats(torch.nn.Module):
    def __init__(self, features: int, magnitude: bool):
        super().__init__()
        self.register_buffer("hessian", torch.zeros(features, features))  # sum of x x^T
        self.register_buffer("rows", torch.zeros((), dtype=torch.int64))
        self.register_buffer("abs_sum", torch.zeros(features if magnitude else 0))  # sum of |x| (AWQ)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self.hessian.addmm_(rows.T, rows)
        self.rows += rows.shape[0]
        if self.abs_sum.numel():
            self.abs_sum += rows.abs().sum(0)
        return x

    def magnitude(self) -> torch.Tensor:
        """The mean |x| of each input channel (AWQ's s_X)."""
        return self.abs_sum / self.rows.clamp(min=1)


def insert(module: GraphModule, layers: list[Layer]) -> int:
    """Put an InputStats in front of every input a data-driven method's linear reads; how many."""
    groups: dict[Node, list[Layer]] = {}
    for layer in layers:
        if layer.weights.method in WEIGHT_METHODS_WITH_DATA:
            groups.setdefault(layer.input, []).append(layer)
    for index, (x, users) in enumerate(groups.items()):
        name = f"{PREFIX}{index}"
        features = users[0].weight(module).shape[1]
        module.add_submodule(name, InputStats(features, any(u.weights.method == "awq" for u in users)))
        with module.graph.inserting_before(users[0].node):
            stats = module.graph.call_module(name, (x,))
        stats.meta = {k: v for k, v in users[0].node.meta.items() if k == "nn_module_stack"}
        for layer in users:
            layer.node.replace_input_with(x, stats)
    module.recompile()
    return len(groups)


def stats_of(module: GraphModule, layer: Layer) -> InputStats | None:
    x = layer.input
    if isinstance(x, Node) and x.op == "call_module" and str(x.target).startswith(PREFIX):
        return module.get_submodule(x.target)
    return None


def remove(module: GraphModule) -> None:
    """Take the InputStats modules out of the graph (their inputs go straight to the linears again)."""
    for node in list(module.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(PREFIX):
            node.replace_all_uses_with(node.args[0])
            module.graph.erase_node(node)
            module.delete_submodule(node.target)
    module.recompile()


def summary(module: GraphModule) -> dict[str, int]:
    """What the calibrated artifact holds: how many inputs were collected, over how many rows (tokens)."""
    found = [m for name, m in module.named_children() if name.startswith(PREFIX)]
    return {"inputs": len(found), "rows": int(found[0].rows) if found else 0}
