"""Where each quantized op's output can be read, in the fp32 reference and the int8 model (PyTorch).

The fp32 reference is the calibrated module (the prepared graph: the same attention rewrite,
equalization and BN folding as the int8 graph) with its observers passing values through.
convert_pt2e rewrites a prepared graph in place: an observer becomes quantize -> dequantize and
every other node keeps its name, so a quantize node's input in the converted graph has the
name of the observed node in the reference. Those names are the measuring points; each is
keyed by the module it came from (`nn_module_stack`).

Each point is measured three ways on a batch:
- reference: the node's value in the calibrated module;
- accumulated: the int8 model's value there (after its output's quantize/dequantize, what the
  next op reads), on the int8 model's own inputs;
- local: the same, but with every quantize node fed the reference value of its input, so the
  op sees the fp32 input quantized as the int8 model would, and only its own error shows (on an
  int8 copy with the float biases where calibrate corrected them: report.layers.modules).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from quantcli._torch import torch
from quantcli.quantizers.patterns import KIND

_QD = "quantized_decomposed."
_MOVES = ("shared", "split", "getitem")  # quantizer pattern kinds whose output shares the input's qparams


def _target(node: Any) -> str:
    return str(node.target) if node.op == "call_function" else ""


def is_quantize(node: Any) -> bool:
    return _target(node).startswith(_QD + "quantize_per")


def is_dequantize(node: Any) -> bool:
    return _target(node).startswith(_QD + "dequantize_per")


@dataclass(frozen=True)
class Point:
    """A quantized op's output: the FX node, where it came from, and the quantize that reads it (if any)."""

    node: str
    module: str
    module_type: str
    op: str
    quantized_output: bool  # False for an op that reads int8 but whose output stays float (a last Linear)
    depth: int  # its position among the points, in graph order


def _origin(node: Any) -> tuple[str, str]:
    """(innermost module path, its class name) from nn_module_stack; ("", "") at the root."""
    stack = [v for v in (node.meta.get("nn_module_stack") or {}).values() if v[0]]
    if not stack or node.op == "placeholder":  # a graph input belongs to no module
        return "", ""
    path, mtype = stack[-1]
    name = mtype if isinstance(mtype, str) else getattr(mtype, "__qualname__", str(mtype))
    return path, name.rsplit(".", 1)[-1]


def _weighted(node: Any) -> bool:
    """Whether a node reads a dequantized weight (a conv/linear/matmul of the int8 model)."""
    return any(is_dequantize(a) and a.args and getattr(a.args[0], "op", "") == "get_attr" for a in node.all_input_nodes)


def points(converted: Any) -> list[Point]:
    """Every measuring point of the in-process converted module, in graph order.

    A point is a node whose output is quantized (a quantize node reads it), or an op that reads a
    dequantized weight but whose output stays float. Graph inputs quantized at entry count too
    (module "", op "input"): input quantization is error the model has before its first op. Ops
    that only move data (reshape, transpose, slice, max pool...) keep their input's quantization
    parameters and add no error of their own: they are not points.
    """
    found: list[Point] = []
    for node in converted.graph.nodes:
        quantized = any(is_quantize(u) for u in node.users)
        if node.op == "get_attr" or is_dequantize(node) or is_quantize(node) or KIND.get(node.target) in _MOVES:
            continue
        if not quantized and not (node.op == "call_function" and _weighted(node)):
            continue
        module, mtype = _origin(node)
        op = "input" if node.op == "placeholder" else _target(node).removeprefix("aten.")
        found.append(Point(node.name, module, mtype, op, quantized, len(found)))
    return found


def names(found: list[Point]) -> dict[str, str]:
    """node -> the point's name: the module path where it holds one point, else `module:node`."""
    per_module: dict[str, int] = {}
    for p in found:
        per_module[p.module] = per_module.get(p.module, 0) + 1
    return {
        p.node: p.module if p.module and per_module[p.module] == 1 else (f"{p.module}:{p.node}" if p.module else p.node)
        for p in found
    }


def output_points(converted: Any, found: list[Point]) -> dict[str, int]:
    """Points whose output stays float and is a model output: node -> its index among the outputs."""
    output = next(n for n in converted.graph.nodes if n.op == "output")
    flat = torch.utils._pytree.tree_leaves(output.args[0])  # torch has no public pytree module
    index = {getattr(n, "name", None): i for i, n in enumerate(flat)}
    return {p.node: index[p.node] for p in found if not p.quantized_output and p.node in index}


def quantized_inputs(converted: Any) -> set[str]:
    """The nodes quantize nodes read: the values local mode replaces with the reference's."""
    return {n.args[0].name for n in converted.graph.nodes if is_quantize(n) and hasattr(n.args[0], "name")}


class Tap(torch.fx.Interpreter):
    """Runs a GraphModule and keeps the values of the watched nodes (after their output's q/dq).

    With `substitute` (node name -> tensor), every quantize node whose input is one of those
    nodes quantizes the substituted tensor instead: the "local" mode.
    """

    def __init__(self, module: Any, watch: Iterable[str], substitute: dict[str, Any] | None = None):
        super().__init__(module)
        self.watch = set(watch)
        self.substitute = substitute
        self.values: dict[str, Any] = {}
        self._dq_of = {}  # the dequantize after a watched node's quantize: its value is the int8 output
        for node in module.graph.nodes:
            if is_quantize(node) and node.args[0].name in self.watch:
                for user in node.users:
                    if is_dequantize(user):
                        self._dq_of[user.name] = node.args[0].name

    def run_node(self, n: Any) -> Any:
        if self.substitute is not None and is_quantize(n) and n.args[0].name in self.substitute:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            result = self.call_function(n.target, (self.substitute[n.args[0].name], *args[1:]), kwargs)
        else:
            result = super().run_node(n)
        if n.name in self._dq_of:
            self.values[self._dq_of[n.name]] = result
        elif n.name in self.watch and n.name not in self.values:
            self.values[n.name] = result
        return result


def observe(
    module: Any, args: tuple, watch: Iterable[str], substitute: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """(the module's output, the watched values) on one batch."""
    tap = Tap(module, watch, substitute)
    with torch.no_grad():
        out = tap.run(*args)
    return out, tap.values


def float_reference(module: Any) -> Any:
    """The calibrated module as the fp32 reference: observers pass values through (QAT fake quant off)."""
    from torchao.quantization.pt2e import disable_fake_quant

    module.apply(disable_fake_quant)
    return module
