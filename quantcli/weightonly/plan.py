"""Which linears of a captured graph weight-only quantization quantizes, and with which weights setting.

A linear is an `aten.linear` whose weight [N, K] is a parameter of the model (a get_attr node), as
torch's nn.Linear captures, or an `aten.addmm(bias, x, weight)` whose weight is stored [K, N], as
GPT-2's Conv1D captures (the methods see it as [N, K], like any other). Its module path and class
decide its setting through the recipe's exclude lists and overrides (quantcli.quantizers.policy), as
for static quantization. An embedding is an `aten.embedding` reading a parameter table [vocab, hidden];
it is quantized where its setting is blocked (ONNX Runtime's GatherBlockQuantized takes blocks along
the hidden axis only), by round to nearest: no data says which of its rows matter. A tied LM head is a
linear reading the embedding's table: where both have one setting, the embedding reads the head's
quantized weight (one table in the file, as onnxruntime-genai's builder shares it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from quantcli.quantizers.policy import check_matches, module_scope, weights_of
from quantcli.recipe import QuantizationSection, WeightsConfig

LINEAR = torch.ops.aten.linear.default
ADDMM = torch.ops.aten.addmm.default  # GPT-2's Conv1D: addmm(bias, x, weight [K, N])
EMBEDDING = torch.ops.aten.embedding.default


@dataclass(frozen=True)
class Layer:
    node: Node  # the aten.linear (or aten.addmm) node
    module: str  # the module path it runs in, e.g. model.layers.0.mlp.down_proj
    weights: WeightsConfig

    @property
    def transposed(self) -> bool:
        """Whether the parameter is stored [K, N] (addmm) rather than [N, K] (linear)."""
        return self.node.target is ADDMM

    @property
    def input(self) -> Node:
        return self.node.args[1 if self.transposed else 0]

    @property
    def weight_node(self) -> Node:
        return self.node.args[2 if self.transposed else 1]

    @property
    def weight_target(self) -> str:
        return self.weight_node.target

    def weight(self, module: GraphModule) -> torch.Tensor:
        """The float weight [N, K], whatever the layout it is stored in."""
        w = attribute(module, self.weight_target).detach()
        return w.T.contiguous() if self.transposed else w


@dataclass(frozen=True)
class Embedding:
    node: Node  # the aten.embedding node
    module: str
    weights: WeightsConfig
    weight_target: str  # the table's get_attr target


def attribute(module: GraphModule, target: str) -> Any:
    """The parameter or buffer a get_attr target names (a dotted path)."""
    return functools.reduce(getattr, target.split("."), module)


def is_linear(node: Node) -> bool:
    weight = None
    if node.op == "call_function" and node.target is LINEAR:
        weight = node.args[1]
    elif node.op == "call_function" and node.target is ADDMM and not node.kwargs:  # beta = alpha = 1
        weight = node.args[2]
    return isinstance(weight, Node) and weight.op == "get_attr"


def layers(module: GraphModule, q: QuantizationSection) -> list[Layer]:
    """The linears to quantize, in graph order, each with its setting (a glob that matches nothing is an error)."""
    check_matches(q, module.graph)
    found = []
    for node in module.graph.nodes:
        if not is_linear(node):
            continue
        weights = weights_of(q, node)
        paths, _ = module_scope(node)
        layer = Layer(node, paths[-1] if paths else node.name, weights)
        if weights is not None and attribute(module, layer.weight_target).dim() == 2:
            found.append(layer)
    return found


def is_embedding(node: Node) -> bool:
    table = node.args[0] if node.op == "call_function" and node.target is EMBEDDING else None
    return isinstance(table, Node) and table.op == "get_attr"


def embeddings(module: GraphModule, q: QuantizationSection) -> list[Embedding]:
    """The embeddings to quantize (blocked settings only), in graph order, each with its setting."""
    found = []
    for node in module.graph.nodes:
        if not is_embedding(node) or attribute(module, node.args[0].target).dim() != 2:
            continue
        weights = weights_of(q, node)
        if weights is not None and weights.block_size is not None:
            paths, _ = module_scope(node)
            found.append(Embedding(node, paths[-1] if paths else node.name, weights, node.args[0].target))
    return found
