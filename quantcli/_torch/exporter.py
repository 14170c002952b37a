"""The dynamo ONNX exporter as quantcli calls it: its ATen -> ONNX table built once per process, and the
steps of torch.onnx.export skipped where they would not change a program (the re-trace of its decompositions,
the type-promotion pass, one quadratic rewrite rule), each replaced for the one call and put back after.

Part of the torch gateway (quantcli._torch): these hooks reach private exporter and onnxscript APIs, which
the next torch release may move.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import operator as _operator
from collections.abc import Iterator
from typing import Any

from torch.onnx._internal.exporter import _registration

from quantcli._torch import _replaced, no_stack_traces, torch


class _DeferredDecomp(_registration.OnnxDecompMeta):
    """An OnnxDecompMeta whose signature is inferred by `signed()`, not when it is made."""

    def __post_init__(self) -> None:
        self.pending = True

    def signed(self) -> _DeferredDecomp:
        if self.pending:
            self.pending = False
            super().__post_init__()
        return self


class _Registry(_registration.ONNXRegistry):
    """An ONNXRegistry whose deferred entries are signed as an export looks their op up."""

    def get_decomps(self, target: Any) -> list[Any]:
        decomps = super().get_decomps(target)
        return [d.signed() if isinstance(d, _DeferredDecomp) else d for d in decomps]


@functools.cache
def _onnx_registry(opset: int) -> Any:
    """The dynamo exporter's table of ATen -> ONNX functions for `opset`, built once per process.

    torch.onnx.export builds it on every call (0.5 s, more than the export of a small model takes); the exporter
    only reads it. Built as `ONNXRegistry.from_torchlib` builds it, entry for entry and in its order, except that a
    torchlib function's ONNX signature is inferred (by OnnxDecompMeta's own inference) when an export first looks
    its op up: from_torchlib infers all ~500 at once, parsing each one's Python source, 1.2 of the 1.9 s it took
    in a new process (AMD EPYC with AVX2), where an export uses a few dozen.
    """
    from onnxscript.function_libs.torch_lib import ops, registration

    del ops  # imported for the registrations it makes
    registry = _Registry()
    registry._opset_version = opset
    for meta in _registration._torchlib_registry.get_torchlib_ops():  # torch's own functions, as from_torchlib
        registry._register(meta.fx_target, meta)
    for name, functions in registration.default_registry.items():  # onnxscript's get_torchlib_ops, less the IR
        target = None if name.startswith("internal::") else _registration._get_overload(name)
        if target is not None:
            for function, is_complex in [
                *((f, False) for f in functions.overloads),
                *((f, True) for f in functions.complex),
            ]:
                registry._register(target, _DeferredDecomp(function, target, None, is_complex=is_complex))
    registry._cleanup_registry_based_on_opset_version()
    return registry


def onnx_program(
    program: Any,
    *,
    opset: int,
    input_names: list[str],
    output_names: list[str],
    translations: dict[str, Any] | None = None,
) -> Any:
    """torch.onnx.export(program, dynamo=True, optimize=True) of an ExportedProgram, as an ONNXProgram;
    `translations`: {"namespace::op": ONNX function} for custom ops in the program."""
    from torch.onnx._internal.exporter import _core

    registry = _onnx_registry(opset)
    for name, function in (translations or {}).items():
        if not any(d.is_custom for d in registry.get_decomps(name)):
            namespace, op = name.split("::")
            registry.register_op(getattr(getattr(torch.ops, namespace), op).default, function)
    with (
        no_stack_traces(),
        _decompositions_only_where_needed(),
        _type_promotion_only_where_needed(),
        _without_quadratic_rewrites(),
    ):
        return _core.export(
            program,
            (),
            {},
            registry=registry,
            dynamic_shapes={},
            input_names=input_names,
            output_names=output_names,
            verbose=False,
            optimize=True,
            opset_version=opset,
        )


# onnxscript's rewrite rules whose matcher, for every node, walks every node of the graph: SlicesSplit (two
# Slices of the halves of the last axis -> one Split) is the only rule of the exporter's optimizer that matches
# two nodes. On the 1568-node int8 graph of a small EVA-02 the export took 59 s with it and 27 s without, and the
# file came out the same (torch's Slices carry a steps input its pattern lacks); where it fires, its Split runs no
# faster in ORT than the two Slices (scripts/bench_kernels.py, halves).
_QUADRATIC_REWRITES = frozenset({"SlicesSplit"})


@contextlib.contextmanager
def _without_quadratic_rewrites() -> Iterator[None]:
    """The ONNX exporter's optimizer without `_QUADRATIC_REWRITES` (its other rules and passes as they are)."""
    import onnxscript.rewriter as rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)  # private: the rules optimize_ir reads at call time
    if rules is None:
        yield
        return
    kept = tuple(r for r in rules if getattr(r, "name", None) not in _QUADRATIC_REWRITES)
    with _replaced(rewriter, "_DEFAULT_REWRITE_RULES", kept):
        yield


@contextlib.contextmanager
def _decompositions_only_where_needed() -> Iterator[None]:
    """The ONNX exporter's decomposition step, skipped for a program it would not change.

    torch.onnx.export re-traces every program through `run_decompositions` to lower the ops ONNX has
    no function for: 60 % of the export's time (12 of 21 s CPU for MobileNetV3, profiled). A program
    whose every op has an ONNX function, with no in-place op and no higher-order op (which only the
    re-trace makes functional), translates as it is, once the few ops transformers' models write (`&`,
    `1.0 - mask`, `Tensor.to` on the CPU) and a float CNN's inference BatchNorm and global average pool
    are written as the re-trace writes them; any other goes through the re-trace. Translated directly,
    an op keeps its own ONNX function (`flatten` is written as flatten, where the re-trace lowers it to
    `view`); the ONNX model computes the same outputs (tests/test_export.py). The arithmetic of a dynamic size
    (`operator.mul` of the batch in a ViT's reshape) is translated as it is too, as the re-trace records it again:
    a small ViT's int8 program exported in 0.84 against 3.45 s, the same ops and outputs.
    """
    from torch.onnx._internal.exporter import _decomp, _fx_passes

    decompose = _fx_passes.decompose_with_registry

    def where_needed(program: Any, registry: Any) -> Any:
        implemented = frozenset(_decomp.get_onnx_implemented_overloads(registry))
        lowered = _lowered_ops(implemented)

        def rewrites(graph_module: Any) -> list[tuple[Any, Any]] | None:
            """The nodes to write as the re-trace does (in the program's own graph), or None where the program
            needs the re-trace."""
            found = []
            for module in graph_module.modules():
                for node in module.graph.nodes if isinstance(module, torch.fx.GraphModule) else ():
                    target = node.target
                    if node.op != "call_function" or target is _operator.getitem or target in _EXPORTER_DROPS:
                        continue
                    if _size_arithmetic(node, registry):
                        continue
                    dtype = _cpu_cast(node) if target in _CASTS else None
                    if (
                        target in _RENAMED
                        or dtype is not None
                        or _plain_rsub(node)
                        or _eval_form(node)
                        or _inference_dropout(node)
                    ):
                        if module is not graph_module:
                            return None
                        found.append((node, dtype))
                    elif (
                        not isinstance(target, torch._ops.OpOverload)
                        or target in lowered
                        or target not in implemented
                        or target._schema.is_mutable
                    ):
                        return None
            return found

        found = rewrites(program.graph_module)
        if found is None:
            return decompose(program, registry)
        if found:  # in a copy of the graph: the caller's program stays as it was, as after the re-trace
            graph_module = program.graph_module
            program = program._update(  # private: how ExportedProgram's own passes make their result
                torch.fx.GraphModule(graph_module, copy.deepcopy(graph_module.graph)), program.graph_signature
            )
            copied = {node.name: node for node in program.graph.nodes}
            for node, dtype in found:
                _as_lowered(copied[node.name], dtype)
            program.graph_module.recompile()
        return program

    with _replaced(_fx_passes, "decompose_with_registry", where_needed):
        yield


@contextlib.contextmanager
def _type_promotion_only_where_needed() -> Iterator[None]:
    """The ONNX exporter's type-promotion pass, skipped for a graph it would not change.

    The pass re-runs every node on fake tensors to find the arguments whose dtype differs from the one the
    op computes in (an int tensor or scalar beside a float one, int division), and casts those: a quarter of
    the export's time on a small CNN, where it casts nothing. Here each node the pass has a rule for is
    previewed on the dtypes recorded in the graph, as the pass itself decides; where any argument would be
    cast the whole pass runs as torch wrote it, so a graph comes out exactly as it did.
    """
    from torch.onnx._internal.exporter import _fx_passes
    from torch.onnx._internal.fx.passes import type_promotion

    promote = _fx_passes.insert_type_promotion_nodes

    def where_needed(graph_module: Any) -> None:
        table = type_promotion.TypePromotionTable()
        for module in graph_module.modules():
            for node in module.graph.nodes if isinstance(module, torch.fx.GraphModule) else ():
                rule = type_promotion.get_type_promotion_rule(node, table) if node.op == "call_function" else None
                if rule is not None and _would_cast(node, rule):
                    promote(graph_module)
                    return

    with _replaced(_fx_passes, "insert_type_promotion_nodes", where_needed):
        yield


_UNRECORDED = object()  # a node without the value torch.export records (node.meta["val"])


def _recorded(arg: Any) -> Any:
    """An fx argument with each node replaced by its recorded value."""
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("val", _UNRECORDED)
    if isinstance(arg, (list, tuple)):
        return type(arg)(_recorded(a) for a in arg)
    return arg


def _would_cast(node: Any, rule: Any) -> bool:
    """Whether the exporter's type promotion would change `node`: an argument to cast to the dtype `rule` computes
    in (or one the pass cannot handle, which it reports itself)."""
    from torch.onnx._internal.fx import type_utils

    def differs(arg: Any, value: Any, dtype: Any) -> bool:  # type_promotion's _maybe_promote_arg, deciding only
        if dtype is None:
            return False
        if isinstance(arg, torch.fx.Node):
            if isinstance(value, torch.Tensor):
                return value.dtype != dtype
            return not type_utils.is_torch_symbolic_type(value) or (
                type_utils.from_scalar_type_to_torch_dtype(type(value)) != dtype
            )
        scalar = type_utils.from_scalar_type_to_torch_dtype(type(arg))
        if scalar is not None:
            return scalar != dtype
        if isinstance(arg, (list, tuple)):
            return any(differs(a, v, dtype) for a, v in zip(arg, value, strict=True))
        return True

    args, kwargs = _recorded(node.args), {name: _recorded(a) for name, a in node.kwargs.items()}
    info = rule.preview_type_promotion(args, kwargs)
    return any(differs(a, args[i], info.args_dtypes.get(i)) for i, a in enumerate(node.args)) or any(
        differs(a, kwargs[name], info.kwargs_dtypes.get(name)) for name, a in node.kwargs.items()
    )


@functools.lru_cache(maxsize=4)
def _lowered_ops(implemented: frozenset[Any]) -> frozenset[Any]:
    """The ops the exporter's re-trace lowers, given those with an ONNX function: the keys of its decomposition table,
    which torch builds anew on each call from every registered decomposition (50 ms, 1223 ops)."""
    from torch.onnx._internal.exporter import _decomp

    return frozenset(_decomp.create_onnx_friendly_decomposition_table(set(implemented)))


def _size_arithmetic(node: Any, registry: Any) -> bool:
    """Whether a node computes a symbolic size with a Python operator or torch.sym_* function the exporter has an
    ONNX function for (`operator.mul` of a batch size in a reshape's shape): the re-trace records it again as it is."""
    return (
        not isinstance(node.target, torch._ops.OpOverload)
        and isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))
        and registry.is_registered(node.target)
    )


# the checks torch.export writes, which the ONNX exporter removes right after its decompositions
_EXPORTER_DROPS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_async.default,
    torch.ops.aten._assert_async.msg,
    torch.ops.aten.sym_constrain_range_for_size.default,
}
# ops the re-trace lowers to one other op on the same arguments
_RENAMED = {
    torch.ops.aten.__and__.Tensor: torch.ops.aten.bitwise_and.Tensor,
    torch.ops.aten.__or__.Tensor: torch.ops.aten.bitwise_or.Tensor,
    torch.ops.aten.min.other: torch.ops.aten.minimum.default,
    torch.ops.aten.max.other: torch.ops.aten.maximum.default,
}
_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten.to.device, torch.ops.aten.to.dtype_layout}
_RSUB = torch.ops.aten.rsub.Scalar  # `1.0 - mask`: the re-trace writes sub(1.0, mask)


def _plain_rsub(node: Any) -> bool:
    """A `scalar - tensor` node with no alpha, which the re-trace writes as sub(scalar, tensor)."""
    return node.target is _RSUB and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1


_BATCH_NORM = torch.ops.aten.batch_norm.default
# dropout as an eval-mode program holds it (torchvision's `Dropout(inplace=True)` is the in-place one, which has
# no ONNX function): the re-trace writes it as nothing
_DROPOUTS = {torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default}
# a global average pool, which the re-trace writes as a mean over these dims (kept)
_GLOBAL_POOLS = {torch.ops.aten.adaptive_avg_pool2d.default: [-1, -2], torch.ops.aten.adaptive_avg_pool1d.default: [-1]}


def _eval_form(node: Any) -> bool:
    """A float program's inference BatchNorm (running statistics) or global average pool, which the re-trace writes
    as `_native_batch_norm_legit_no_training` and `mean`."""
    if node.target is _BATCH_NORM:
        return len(node.args) == 9 and not node.kwargs and node.args[5] is False and node.args[3] is not None
    return node.target in _GLOBAL_POOLS and len(node.args) == 2 and all(size == 1 for size in node.args[1])


def _inference_dropout(node: Any) -> bool:
    """A dropout that passes its input through (train=False) on a tensor the graph computed (no input is
    changed in place)."""
    return (
        node.target in _DROPOUTS
        and len(node.args) == 3
        and node.args[2] is False
        and isinstance(node.args[0], torch.fx.Node)
        and node.args[0].op != "placeholder"
    )


def _cpu_cast(node: Any) -> Any:
    """The dtype a `Tensor.to` node gives its input (the input's own where it names none), or None where
    it also moves the tensor off the CPU or changes its layout or memory format."""
    normalized = node.normalized_arguments(node.graph.owning_module, normalize_to_only_use_kwargs=True)
    kwargs = normalized.kwargs if normalized is not None else None
    if kwargs is None or kwargs.get("layout") not in (None, torch.strided):
        return None
    if kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
        return None
    if kwargs.get("memory_format") not in (None, torch.preserve_format):
        return None
    return kwargs.get("dtype") or node.args[0].meta["val"].dtype


def _as_lowered(node: Any, dtype: Any) -> None:
    """`node` as the re-trace writes it: a renamed op, `scalar - tensor` as sub(scalar, tensor), a cast (to `dtype`,
    `_cpu_cast`'s) as _to_copy, no node for a cast to its own dtype or an inference dropout (its module is then
    recompiled by the caller), or a copy where the program outputs that node (the signature names its output)."""
    if node.target in _RENAMED:
        node.target = _RENAMED[node.target]
    elif node.target is _RSUB:
        node.target, node.args = torch.ops.aten.sub.Tensor, (node.args[1], node.args[0])
    elif node.target in _GLOBAL_POOLS:
        node.target, node.args = torch.ops.aten.mean.dim, (node.args[0], _GLOBAL_POOLS[node.target], True)
    elif node.target is _BATCH_NORM:
        _as_native_batch_norm(node)
    else:
        source = node.args[0]
        if node.target in _DROPOUTS or dtype == source.meta["val"].dtype:
            if any(user.op == "output" for user in node.users):  # a program output by its name: kept, as a copy
                node.target, node.args, node.kwargs = torch.ops.aten.clone.default, (source,), {}
                return
            node.replace_all_uses_with(source)
            node.graph.erase_node(node)
        else:
            node.target, node.args, node.kwargs = torch.ops.aten._to_copy.default, (source,), {"dtype": dtype}


def _as_native_batch_norm(node: Any) -> None:
    """batch_norm(x, w, b, mean, var, False, momentum, eps, cudnn) as the re-trace writes it: the first output of
    _native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)."""
    from torch._guards import detect_fake_mode

    x, weight, bias, mean, var, _, momentum, eps, _ = node.args
    graph, args = node.graph, (x, weight, bias, mean, var, momentum, eps)
    with graph.inserting_before(node):
        norm = graph.call_function(torch.ops.aten._native_batch_norm_legit_no_training.default, args)
        first = graph.call_function(_operator.getitem, (norm, 0))
    values = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    with detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)]):
        norm.meta = {**node.meta, "val": norm.target(*values)}
    first.meta = dict(node.meta)
    node.replace_all_uses_with(first)
    graph.erase_node(node)
