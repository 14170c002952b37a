"""The skeleton every FX rewrite before annotation runs in: visit each node once, count, then tidy once.

A rewrite is a function of one node that changes the graph around it and says whether it did.
`rewrite_each` runs it over a snapshot of the nodes in graph order (so nodes it inserts are not
visited), passing how many it has rewritten so far (for names that another process, re-running
prepare, builds the same), and when anything changed drops dead nodes, checks the graph and
recompiles the module once. The ONNX passes' counterpart is `quantcli.onnx.graph`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import GraphModule, Node


def rewrite_each(model: GraphModule, rewrite: Callable[[Node, int], bool]) -> int:
    """Call `rewrite(node, done)` on every node of `model`'s graph; return how many it rewrote."""
    done = 0
    for node in list(model.graph.nodes):
        if rewrite(node, done):
            done += 1
    if done:
        model.graph.eliminate_dead_code()
        model.graph.lint()
        model.recompile()
    return done


def call_like(graph, like: Node, target, args, val: torch.Tensor) -> Node:
    """A call to `target` with `like`'s metadata (module stack, so exclusions follow) and its own value."""
    new = graph.call_function(target, args)
    new.meta.update({k: v for k, v in like.meta.items() if k != "val"})
    new.meta["val"] = val
    return new


def replace(graph, old: Node, new: Node) -> None:
    """Every user of `old` reads `new`; `old` goes."""
    old.replace_all_uses_with(new)
    graph.erase_node(old)
