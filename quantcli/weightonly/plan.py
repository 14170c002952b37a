"""Which linears of a captured graph weight-only quantization quantizes, and with which weights setting.

A linear is an `aten.linear` whose weight is a parameter of the model (a get_attr node), as torch's
nn.Linear captures; its module path and class decide its setting through the recipe's exclude lists
and overrides (quantcli.quantizers.policy), as for static quantization. Embeddings are no linears:
they stay float. A tied LM head is a linear reading the embedding's weight: it is quantized, the
embedding keeps the float weight.
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


@dataclass(frozen=True)
class Layer:
    node: Node  # the aten.linear node
    module: str  # the module path it runs in, e.g. model.layers.0.mlp.down_proj
    weights: WeightsConfig

    @property
    def weight_target(self) -> str:
        return self.node.args[1].target


def attribute(module: GraphModule, target: str) -> Any:
    """The parameter or buffer a get_attr target names (a dotted path)."""
    return functools.reduce(getattr, target.split("."), module)


def is_linear(node: Node) -> bool:
    weight = node.args[1] if node.op == "call_function" and node.target is LINEAR else None
    return isinstance(weight, Node) and weight.op == "get_attr"


def layers(module: GraphModule, q: QuantizationSection) -> list[Layer]:
    """The linears to quantize, in graph order, each with its setting (a glob that matches nothing is an error)."""
    check_matches(q, module.graph)
    found = []
    for node in module.graph.nodes:
        if not is_linear(node) or attribute(module, node.args[1].target).dim() != 2:
            continue
        weights = weights_of(q, node)
        if weights is not None:
            paths, _ = module_scope(node)
            found.append(Layer(node, paths[-1] if paths else node.name, weights))
    return found
