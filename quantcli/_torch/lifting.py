"""The converted module as an ExportedProgram without tracing it again.

convert_pt2e works on `program.module()`, a GraphModule whose graph reads the weights with get_attr; saving it
needs an ExportedProgram, which torch.export makes by tracing the module again: every node re-run on fake
tensors through make_fx. On the test suite that re-trace was 8 % of all CPU time, and 1.9 of convert's 3.3 s on
EfficientNet-Lite0 (EPYC, AVX2). The converted graph is already what such a trace gives (ATen ops, the values
torch.export recorded, the captured program's symbolic shapes), so `lifted` builds the program from it as
torch.export would: each attribute read becomes an input (parameters, then buffers, then other tensors, named
p_/b_/c_ and the attribute's path, as torch names them; a non-persistent buffer kept with the constants, out of
the state dict), the user inputs follow, the ops keep their order and recorded values (a node convert added
gets its value by running its op on the fake values of its inputs), and the signature, shape ranges and call
graph are the captured program's (the same inputs and outputs). On the CNNs it was tried on the ONNX model comes
out the same to the byte; where torch's trace would order or name a node otherwise (the dynamic-size reads of a
transformer), the ONNX model computes the same values.

A graph holding anything else (a call of a submodule, a higher-order op) is left to torch.export (`None`).
Private torch APIs: ExportedProgram's constructor and its signature types, which the next release may move.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch._export.verifier import SpecViolationError
from torch.export.exported_program import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)

_PREFIXES = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_", InputKind.CONSTANT_TENSOR: "c_"}
_GUARDS = "_guards_fn"  # the shape check program.module() calls first; the program checks its inputs itself


def lifted(module: torch.fx.GraphModule, template: Any) -> ExportedProgram | None:
    """`module` (from `template.module()`, converted) as an ExportedProgram, or None where it holds what this
    does not lift."""
    graph = module.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if not all(_plain(n) for n in graph.nodes) or not inputs or not all(_tensor(n) for n in inputs):
        return None
    fake_mode = next((v.fake_mode for n in inputs if hasattr(v := n.meta.get("val"), "fake_mode")), None)
    if fake_mode is None:
        return None
    read = {n.target for n in graph.nodes if n.op == "get_attr"}
    kinds = {name: InputKind.PARAMETER for name, _ in module.named_parameters() if name in read}
    kinds |= {name: InputKind.BUFFER for name, _ in module.named_buffers() if name in read}
    kinds |= {name: InputKind.CONSTANT_TENSOR for name in sorted(read - set(kinds))}
    transient = {  # buffers registered persistent=False: in the program's constants, as torch.export keeps them
        f"{prefix}.{name}" if prefix else name
        for prefix, owner in module.named_modules()
        for name in owner._non_persistent_buffers_set
    }
    fresh = torch.fx.Graph()
    values: dict[torch.fx.Node, torch.fx.Node] = {}
    specs, state, constants, attrs = [], {}, {}, {}
    for name, kind in sorted(kinds.items(), key=lambda item: list(_PREFIXES).index(item[1])):  # stable: in order
        value = module.get_parameter(name) if kind is InputKind.PARAMETER else _attribute(module, name)
        if not isinstance(value, torch.Tensor):
            return None
        node = fresh.placeholder(_PREFIXES[kind] + re.sub(r"[^a-zA-Z0-9]", "_", name).lower())
        node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
        attrs[name] = node
        (constants if kind is InputKind.CONSTANT_TENSOR or name in transient else state)[name] = value
        persistent = name not in transient if kind is InputKind.BUFFER else None
        specs.append(InputSpec(kind=kind, arg=TensorArgument(name=node.name), target=name, persistent=persistent))
    for old in inputs:
        values[old] = node = fresh.placeholder(old.name)
        node.meta = copy.copy(old.meta)
        specs.append(InputSpec(kind=InputKind.USER_INPUT, arg=TensorArgument(name=node.name), target=None))
    outputs: list[OutputSpec] = []
    for old in graph.nodes:
        if old.op == "get_attr":
            values[old] = attrs[old.target]
        elif old.op == "call_function":
            args, kwargs = torch.fx.map_arg((old.args, old.kwargs), values.__getitem__)
            values[old] = node = fresh.create_node("call_function", old.target, args, kwargs, _name(old.target))
            node.meta = copy.copy(old.meta)
            if "val" not in node.meta:
                fake_args, fake_kwargs = torch.fx.map_arg((args, kwargs), lambda a: a.meta["val"])
                with fake_mode:
                    node.meta["val"] = old.target(*fake_args, **fake_kwargs)
        elif old.op == "output":
            results = old.args[0]
            if not isinstance(results, (tuple, list)) or not all(isinstance(r, torch.fx.Node) for r in results):
                return None
            if not all(_tensor(values[r]) for r in results):  # an int or a size out: other argument kinds
                return None
            node = fresh.output(type(results)(values[r] for r in results))
            node.meta = copy.copy(old.meta)
            outputs = [
                OutputSpec(kind=OutputKind.USER_OUTPUT, arg=TensorArgument(name=values[r].name), target=None)
                for r in results
            ]
    fresh.lint()
    try:
        return ExportedProgram(
            root=torch.fx.GraphModule(torch.nn.Module(), fresh),
            graph=fresh,
            graph_signature=ExportGraphSignature(input_specs=specs, output_specs=outputs),
            state_dict=state,
            range_constraints=copy.copy(template.range_constraints),
            module_call_graph=copy.deepcopy(template.module_call_graph),
            constants=constants,
            verifiers=template.verifiers,
        )
    except SpecViolationError:  # what torch's verifier refuses, torch.export's trace turns into what it accepts
        return None


def _plain(node: torch.fx.Node) -> bool:
    """A node `lifted` rebuilds: an input, an attribute read, an op, the output, or the guard call nothing reads."""
    if node.op == "call_module":
        return node.target == _GUARDS and not node.users
    if node.op == "call_function":  # an ATen op, or Python's arithmetic on sizes (a reference representation's
        # Python functions, higher-order ops: torch.export traces through them)
        target = node.target
        return isinstance(target, torch._ops.OpOverload) or getattr(target, "__module__", None) == "_operator"
    return node.op in ("placeholder", "get_attr", "output")


def _tensor(node: torch.fx.Node) -> bool:
    """Whether a node's recorded value is a tensor (what a TensorArgument of the signature names)."""
    return isinstance(node.meta.get("val"), torch.Tensor)


def _attribute(module: torch.nn.Module, name: str) -> Any:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def _name(target: Any) -> str:
    """A node's name as make_fx gives it: an ATen op's packet name (conv2d, not conv2d.default)."""
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return getattr(target, "__name__", "op")
