"""The index every ONNX graph pass walks: who produces a value, who reads it, what a constant holds.

The export's rewrites (`quantcli.onnx.rewrite`), the u8s8 emulation (`quantcli.onnx.u8s8`), the
float-island analysis (`quantcli.onnx.islands`) and the int4 weight store (`quantcli.onnx.blocked`)
all look at a graph through one `Graph`. It indexes the graph once; a pass that edits nodes keeps
the index true for the values it changes (`rename_input`, `fresh`) or builds a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

FLOAT_TYPES = frozenset({1, 10, 11, 16})  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def producers(nodes: Iterable[Any]) -> dict[str, Any]:
    """{value name: the node that writes it} over `nodes`."""
    return {o: n for n in nodes for o in n.output if o}


def consumers(nodes: Iterable[Any]) -> dict[str, list[Any]]:
    """{value name: the nodes that read it, in order} over `nodes` (a node reading it twice is listed twice)."""
    users: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


def replace_each(g: Graph, match: Callable[..., Any], apply: Callable[..., set[str]]) -> tuple[int, set[str]]:
    """`apply(g, node, *found)` on every node of the graph (as listed before the first) where `match(g, node)` finds
    something (a tuple, not None); apply returns the value names it stopped reading. (How many, those names.)"""
    released: set[str] = set()
    count = 0
    for node in list(g.graph.node):
        found = match(g, node)
        if found is not None:
            released |= apply(g, node, *found)
            count += 1
    return count, released


def opset_of(model: Any) -> int:
    """The model's opset of the default (ai.onnx) domain."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def drop_initializers(graph: Any, names: set[str]) -> None:
    """Remove the initializers named in `names` that no node reads and no graph output is, in place (the other
    tensors, a model's weights, are not copied)."""
    unread = set(names) - {i for n in graph.node for i in n.input} - {o.name for o in graph.output}
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name in unread:
            del graph.initializer[index]


def insert(graph: Any, nodes: Any, *, before: Any = None, after: Any = None, replacing: Any = ()) -> None:
    """Put `nodes` (one node or a list, kept in order) into `graph`'s node list: right before `before`, right after
    `after`, or where the first of `replacing` (one node or a list) stood, those removed; with none of the three,
    first in the graph (nodes that read initializers only). The node list stays topological when the caller's
    nodes read what is computed before that place."""
    nodes = list(nodes) if isinstance(nodes, (list, tuple)) else [nodes]
    replacing = list(replacing) if isinstance(replacing, (list, tuple)) else [replacing]
    listed = list(graph.node)
    if replacing:
        at = listed.index(replacing[0])
        at -= sum(1 for r in replacing[1:] if listed.index(r) < at)
        for r in replacing:
            graph.node.remove(r)
    elif before is not None:
        at = listed.index(before)
    elif after is not None:
        at = listed.index(after) + 1
    else:
        at = 0
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)


class Graph:
    """Producers, consumers, initializers, constants and value types of an onnx GraphProto."""

    def __init__(self, graph: Any):
        self.graph = graph
        self.inits = {i.name: i for i in graph.initializer}
        self.producer = producers(graph.node)
        self.consumers = consumers(graph.node)
        self.outputs = {o.name for o in graph.output}
        self._consts: dict[str, np.ndarray] | None = None
        self._types: dict[str, Any] | None = None
        self.taken: set[str] = set()

    @property
    def consts(self) -> dict[str, np.ndarray]:
        """{output: value} of the Constant nodes (read when first asked for)."""
        if self._consts is None:
            from onnx import numpy_helper

            self._consts = {
                n.output[0]: numpy_helper.to_array(a.t)
                for n in self.graph.node
                if n.op_type == "Constant"
                for a in n.attribute
                if a.name == "value"
            }
        return self._consts

    @property
    def types(self) -> dict[str, Any]:
        """{value name: its TypeProto.Tensor} for the values shape inference or the signature typed."""
        if self._types is None:
            g = self.graph
            self._types = {v.name: v.type.tensor_type for v in list(g.value_info) + list(g.input) + list(g.output)}
        return self._types

    def initializer(self, name: str) -> np.ndarray | None:
        """The value of initializer `name`, or None when it is not one."""
        from onnx import numpy_helper

        tensor = self.inits.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer, a Constant, or a Cast of one of these."""
        from onnx import helper

        if name in self.inits:
            return self.initializer(name)
        cast = self.producer.get(name)
        if cast is not None and cast.op_type == "Cast" and name not in self.consts:  # the exporter folds no large Cast
            source = self.constant(cast.input[0])
            to = next(a.i for a in cast.attribute if a.name == "to")
            return None if source is None else source.astype(helper.tensor_dtype_to_np_dtype(to))
        return self.consts.get(name)

    def op(self, name: str, op_type: str) -> Any:
        """The node writing `name` when it is an `op_type`, else None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def new_node(self, replaced, op: str, inputs: list[str], output: str | None = None, **attrs) -> Any:
        """A node computing (part of) what `replaced` did: names fresh from its own, its origin metadata, indexed
        as its output's producer."""
        from onnx import helper

        base = replaced.output[0]
        made = helper.make_node(
            op, inputs, [output or self.fresh(f"{base}_{op.lower()}")], name=self.fresh(f"{replaced.name or base}_{op}")
        )
        made.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
        made.metadata_props.extend(replaced.metadata_props)
        self.producer[made.output[0]] = made
        return made

    def per_tensor(self, qdq) -> bool:
        """Whether a QuantizeLinear/DequantizeLinear has one scale, so it commutes with moving values around."""
        scale = self.constant(qdq.input[1])
        return scale is not None and scale.size == 1

    def rank(self, name: str) -> int | None:
        t = self.types.get(name)
        return len(t.shape.dim) if t is not None and t.HasField("shape") else None

    def drop_value_info(self, names: set[str]) -> None:
        """Forget the shapes recorded for `names` (values a rewrite removed or gave another shape)."""
        for v in [v for v in self.graph.value_info if v.name in names]:
            self.graph.value_info.remove(v)

    def add_initializer(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def rename_input(self, old: str, new: str) -> None:
        """Every node reading `old` reads `new` instead."""
        for user in self.consumers.get(old, []):
            user.input[:] = [new if i == old else i for i in user.input]
            self.consumers.setdefault(new, []).append(user)

    def fresh(self, base: str) -> str:
        """A value or node name nothing in the graph uses yet (nor an earlier fresh name)."""
        names = set(self.producer) | set(self.inits) | {i.name for i in self.graph.input}
        names |= {n.name for n in self.graph.node} | self.taken
        name, n = base, 0
        while name in names:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        return name
