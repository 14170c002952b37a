"""The node-list edits every ONNX pass shares (`quantcli.onnx.graph.insert`)."""

from __future__ import annotations

from onnx import helper

from quantcli.onnx.graph import insert


def _graph(names: list[str]):
    nodes = [helper.make_node("Identity", [f"{n}_in"], [f"{n}_out"], name=n) for n in names]
    return helper.make_graph(nodes, "g", [], [])


def _node(name: str):
    return helper.make_node("Identity", [f"{name}_in"], [f"{name}_out"], name=name)


def _names(graph) -> list[str]:
    return [n.name for n in graph.node]


def test_nodes_go_before_after_or_first_in_order():
    g = _graph(["a", "b", "c"])
    insert(g, [_node("x"), _node("y")], before=g.node[1])
    assert _names(g) == ["a", "x", "y", "b", "c"]
    insert(g, _node("z"), after=g.node[4])
    assert _names(g) == ["a", "x", "y", "b", "c", "z"]
    insert(g, [_node("p"), _node("q")])
    assert _names(g) == ["p", "q", "a", "x", "y", "b", "c", "z"]


def test_replaced_nodes_leave_and_the_new_ones_stand_where_the_first_stood():
    g = _graph(["a", "b", "c", "d", "e"])
    insert(g, [_node("x"), _node("y")], replacing=g.node[2])
    assert _names(g) == ["a", "b", "x", "y", "d", "e"]
    g = _graph(["a", "b", "c", "d", "e"])
    # the first of `replacing` is "d": "b", listed earlier, is removed, and the new node takes d's place
    insert(g, _node("x"), replacing=[g.node[3], g.node[1]])
    assert _names(g) == ["a", "c", "x", "e"]
