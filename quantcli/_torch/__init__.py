"""quantcli's gateway to torch and torchao's churning APIs, and the silencing of their noise.

The boundary: the pipeline (stages, training, reports) reaches torch.export, saving and loading
programs and states, prepare/convert, the train/eval switches, BN and observer state and pytree
flattening through this module, and the dynamo ONNX exporter through `quantcli._torch.exporter`, so
the next torch or torchao release is a change in this package. Two
places use torch directly, on purpose: `quantcli.quantizers` is the torchao plugin surface (fx
graphs, QuantizationSpec, observers, op schemas, which a quantizer cannot avoid), and plain tensor
work (`torch.no_grad`, `torch.from_numpy`, functional losses) is imported where it is used.

torch and torchao print noise at import (torchao failing to load CUDA/cp310 kernels, pytree Enum
deprecations, exporter registration messages). Importing this module silences it, precisely, by
logger name and warning category, so that users see only quantcli's own output.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
import types
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_NOISY_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "torch.onnx._internal.exporter._registration",
    "torch.onnx._internal.exporter._core",
    "torch._export",
    "torch.export",
    "onnxscript",
)


def _silence() -> None:
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*treespec.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._export.*")
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")
    # the exporter's constant folding evaluates ops with onnx's reference implementation (log of 0...)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"onnx\.reference\..*")


_silence()

import torch  # noqa: E402
import torchao  # noqa: E402,F401  (registers quantized_decomposed ops used by saved programs)
from torchao.quantization.pt2e import (  # noqa: E402
    FakeQuantizeBase,
    disable_observer,
    move_exported_model_to_train,
)
from torchao.quantization.pt2e import export_utils as _export_utils  # noqa: E402  (private: see to_eval)
from torchao.quantization.pt2e import qat_utils as _qat_utils  # noqa: E402  (private: see _present_convs_only)
from torchao.quantization.pt2e import (  # noqa: E402  (private: see _traced_patterns_cached)
    reference_representation_rewrite as _reference_rewrite,
)
from torchao.quantization.pt2e import utils as _pt2e_utils  # noqa: E402  (private: see _traced_patterns_cached)
from torchao.quantization.pt2e.constant_fold import constant_fold  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e  # noqa: E402

__all__ = [
    "torch",
    "export_program",
    "lifted",
    "output_leaves",
    "portable_outputs",
    "export_failure",
    "held_output",
    "without_dead_state",
    "prune_unused",
    "save_program",
    "load_program",
    "keep_as_loaded",
    "file_identity",
    "save_state",
    "load_state",
    "prepare",
    "convert",
    "to_train",
    "to_eval",
    "freeze_bn",
    "bn_buffers",
    "fake_quantizers",
    "disable_observers",
    "observers_frozen",
    "refresh_qparams",
    "ddp",
]


@contextlib.contextmanager
def no_stack_traces() -> Iterator[None]:
    """Tracing without recording each node's Python stack (torch.fx.config.do_not_emit_stack_traces).

    torch.export and the ONNX exporter's decompositions record where every node came from; quantcli
    drops those traces before saving a program (`save_program`) and from the ONNX file, and recording
    them was a quarter of the ONNX export's time (1.2 s CPU on EfficientNet-Lite0).
    """
    with _replaced(torch.fx.config, "do_not_emit_stack_traces", True):
        yield


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name` is `value` while the block runs and what it was after: a setting or a private hook of torch,
    torchao or onnxscript changed for one call."""
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def lifted(module: Any, template: Any) -> Any:
    """The converted `module` (from `template.module()`) as an ExportedProgram without a re-trace
    (`quantcli._torch.lifting`), or None where its graph needs torch.export."""
    from quantcli._torch import lifting

    program = lifting.lifted(module, template)
    if program is not None:
        functional_inplace(program.graph_module)
    return program


def export_program(module: Any, args: tuple, dynamic_shapes: Any) -> Any:
    """torch.export.export, non-strict (keeps nn_module_stack), with the recipe's dynamic axes.

    What torch writes meanwhile (see `held_output`) is kept off the terminal; on failure it is
    attached to the exception as a note, which only --debug's traceback shows.
    """
    with held_output() as held:
        try:
            with no_stack_traces():
                program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:
            if held.getvalue().strip():
                exc.add_note("torch's output during torch.export:\n" + held.getvalue().rstrip())
            raise
    functional_inplace(program.graph_module)
    return program


def functional_inplace(module: Any) -> int:
    """Rewrite in-place ATen ops on values nothing else reads (`ReLU6(inplace=True)`'s hardtanh_) to their
    functional forms, in place; how many.

    Every later trace of the program (convert's re-export where the lift cannot serve, the ONNX exporter's
    decompositions) functionalizes an in-place op through torch's reference implementations with the batch symbolic:
    0.2 s for each hardtanh_, 7 s of each trace of EfficientNet-Lite0's 33, where the functional op
    costs nothing. The values are the same. Only an op whose mutated input is an intermediate result
    read by this op alone, and no view of another tensor, is rewritten: then no one can see the mutation.
    """
    rewritten = 0
    for node in module.graph.nodes:
        functional = _functional_variant(node)
        source = node.args[0] if functional is not None else None
        if isinstance(source, torch.fx.Node) and len(source.users) == 1 and _fresh_value(source):
            node.target = functional
            rewritten += 1
    if rewritten:
        module.recompile()
    return rewritten


def _functional_variant(node: Any) -> Any:
    """The functional overload of an in-place ATen op mutating its first argument only (add_.Tensor ->
    add.Tensor), else None."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    schema = target._schema
    writes = [a.alias_info is not None and a.alias_info.is_write for a in schema.arguments]
    name = schema.name.split("::")[1]
    if not name.endswith("_") or name.endswith("__") or writes[:1] != [True] or any(writes[1:]):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    functional = getattr(packet, target._overloadname, None) if packet is not None else None
    if functional is None or functional._schema.is_mutable:
        return None
    if [a.name for a in functional._schema.arguments] != [a.name for a in schema.arguments]:
        return None
    return functional


def _fresh_value(node: Any) -> bool:
    """Whether `node` is an op's result that aliases none of its inputs (not an input, a weight or a view)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    return all(r.alias_info is None for r in target._schema.returns)


class _Hold(logging.Filter):
    """A handler filter that writes each record into `held` instead of letting the handler emit it."""

    def __init__(self, held: io.StringIO):
        super().__init__()
        self.held = held

    def filter(self, record: logging.LogRecord) -> bool:
        self.held.write(f"{record.levelname} {record.name}: {record.getMessage()}\n")
        return False


@contextlib.contextmanager
def held_output() -> Iterator[io.StringIO]:
    """Hold what torch writes during an export: its loggers' records (data-dependent guards, constraint
    reports, exportdb hints), warnings, and the partial FX graphs torch.export prints to sys.stderr
    when it fails (torch/export/_trace.py `_log_export_wrapper`). torch's logging handlers keep the
    stream they were made with, so they are filtered rather than redirected."""
    held = io.StringIO()
    hold = _Hold(held)
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name == "torch" or name.startswith("torch.")
    ]
    terminal = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    handlers = {
        id(h): h
        for lg in loggers
        for h in lg.handlers  # not torch's trace-file handlers
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in terminal
    }.values()
    for handler in handlers:
        handler.addFilter(hold)
    try:
        with contextlib.redirect_stderr(held):
            yield held
    finally:
        for handler in handlers:
            handler.removeFilter(hold)


def export_failure(exc: BaseException) -> str | None:
    """What kind of torch.export failure `exc` is: "data_dependent" (control flow on tensor values),
    "constraints" (a dynamic axis the model does not accept at every size), or None."""
    from torch._dynamo.exc import UserError, UserErrorType
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError, GuardOnDataDependentSymNode

    if isinstance(exc, GuardOnDataDependentSymNode) or (
        isinstance(exc, UserError) and exc.error_type == UserErrorType.DYNAMIC_CONTROL_FLOW
    ):
        return "data_dependent"
    if isinstance(exc, ConstraintViolationError) or (
        isinstance(exc, UserError) and exc.error_type == UserErrorType.CONSTRAINT_VIOLATION
    ):
        return "constraints"
    return None


def output_leaves(result: Any) -> list[tuple[str, Any]]:
    """(dotted path, tensor) of each output of a forward() result, in torch.export's order.

    None leaves are dropped: the ONNX exporter drops them too (ONNX has no None output), so the
    names, the parity figures and the file's outputs stay aligned. torch has no public pytree
    module: torch.utils._pytree is what torch.export itself uses.
    """
    leaves, _ = torch.utils._pytree.tree_flatten_with_path(result)
    return [(".".join(_key_name(k) for k in path), leaf) for path, leaf in leaves if leaf is not None]


def _portable(result: Any) -> bool:
    """Whether a forward() result is built from tensors, None and plain tuples, lists and dicts only."""
    if result is None or isinstance(result, torch.Tensor):
        return True
    if type(result) in (tuple, list):
        return all(_portable(r) for r in result)
    if type(result) is dict:
        return all(_portable(r) for r in result.values())
    return False


@contextlib.contextmanager
def portable_outputs(module: Any, result: Any) -> Iterator[None]:
    """While capturing, return the outputs as a flat tuple when `result` (an eager forward() result)
    holds other containers, such as a Hugging Face ModelOutput.

    A saved program records its output containers by type name, and loading it in the next stage's
    process fails unless that type is registered there (which would mean importing the user's
    libraries from a name in the artifact). A forward hook flattens the result instead: module
    names (what `exclude_names` and overrides match) stay as they are. The names of the outputs
    come from the eager result (`output_leaves`), in the same order.
    """
    if _portable(result):
        yield
        return
    handle = module.register_forward_hook(lambda m, args, out: tuple(t for _, t in output_leaves(out)))
    try:
        yield
    finally:
        handle.remove()


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def runnable(program: Any) -> Any:
    """`program.module()`, with a converted graph's per-tensor quantize and dequantize ops computed in place.

    torchao's reference ops (`quantized_decomposed`) allocate a new tensor at each of their
    arithmetic steps; on a CNN's large activations that is most of the int8 program's time in
    PyTorch (parity runs it on every export). The same steps in the same order, in place, give
    bit-identical values in half the time.
    """
    module = program.module()
    ops = torch.ops.quantized_decomposed
    fast = {ops.quantize_per_tensor.default: _quantize, ops.dequantize_per_tensor.default: _dequantize}
    changed = False
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in fast:
            node.target, changed = fast[node.target], True
    if changed:
        module.recompile()
    return module


def _quantize(x: Any, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: Any) -> Any:
    """quantized_decomposed.quantize_per_tensor's arithmetic, in place."""
    if x.dtype != torch.float32:
        return torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype)
    out = x * (1.0 / scale)
    return out.round_().add_(zero_point).clamp_(quant_min, quant_max).to(dtype)


def _dequantize(
    q: Any, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: Any, *, out_dtype: Any = None
) -> Any:
    """quantized_decomposed.dequantize_per_tensor's arithmetic, in place."""
    if q.dtype != dtype:
        return torch.ops.quantized_decomposed.dequantize_per_tensor(
            q, scale, zero_point, quant_min, quant_max, dtype, out_dtype=out_dtype
        )
    return q.to(out_dtype or torch.float32).sub_(zero_point).mul_(scale)


def save_program(program: Any, path: Path) -> None:
    """torch.export.save, made reproducible: the same program gives the same bytes in every process.

    Node provenance (`meta["from_node"]`, written by passes such as convert_pt2e) records `id()` of
    graphs, a memory address that differs on every run, and stack traces record the absolute
    paths of the Python files involved (the environment's, the user's): both are dropped before
    saving, so two machines or virtual environments give the same program and manifest.

    torch's serializer also canonicalizes a deep copy of the serialized program and throws the copy away
    ("test canonical form is well defined", torch 2.13): that check is left out, the bytes written are the same.
    """
    from torch._export.serde import serialize as _serialize  # private: see above

    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            node.meta.pop("from_node", None)
            node.meta.pop("stack_trace", None)
    with _replaced(_serialize, "canonicalize", _discarded_canonical_form):
        torch.export.save(program, str(path))


def _discarded_canonical_form(program: Any, constants: Any = None) -> Any:
    """In place of torch's `canonicalize` where the serializer discards its result."""
    return program


# Programs this process has loaded, by the file's identity (device, inode, size, modification time), at most
# LOADED_PROGRAMS of them, each file at most CACHED_PROGRAM_BYTES: `quantcli run` reads the captured program
# (carried as a hard link) in prepare, calibrate, convert and export, and a deep copy of a loaded program takes
# 1/30 of loading it again (0.03 against 0.96 s for EfficientNet-Lite0's captured program). Every caller gets its
# own copy: training and load_state_dict write into a program's tensors. A program is kept as loaded, and as saved
# only where it is what loading its file gives (`keep_as_loaded`): one torch.export made still has its tracing's
# shape ranges (a dynamic batch from 2, where the file says from 1).
_LOADED: dict[tuple[int, ...], Any] = {}
LOADED_PROGRAMS = 2
CACHED_PROGRAM_BYTES = 256 * 2**20


def load_program(path: Path) -> Any:
    """The ExportedProgram saved at `path` (`_load_program_file`), a copy of the one this process loaded from the
    same file where it did."""
    try:
        key = file_identity(path)
    except OSError:
        return _load_program_file(path)  # its error
    loaded = _LOADED.get(key)
    if loaded is None:
        loaded = _load_program_file(path)
        if not _keep(key, loaded):
            return loaded
    return copy.deepcopy(loaded)


def keep_as_loaded(program: Any, path: Path) -> None:
    """Keep `program`, just saved at `path`, as if this process had loaded it from there (the caller hands it over:
    it changes it no more; `load_program` gives out copies): for a program whose shape ranges are its file's
    (`lifted`'s, which are the captured program's as loaded), whose ONNX export is then the same to the byte
    (tests/test_pipeline.py). export reads convert's program without a load."""
    _keep(file_identity(path), program)


def _keep(key: tuple[int, ...], program: Any) -> bool:
    if key[2] > CACHED_PROGRAM_BYTES:
        return False
    _LOADED[key] = program
    while len(_LOADED) > LOADED_PROGRAMS:
        del _LOADED[next(iter(_LOADED))]
    return True


def file_identity(path: Path) -> tuple[int, ...]:
    """A file as a process can tell it apart: device, inode, size, modification time (a file written since differs)."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _load_program_file(path: Path) -> Any:
    """torch.export.load without running code from the file.

    torch.export.load is not safe on a crafted .pt2 (torch 2.13): sample inputs that fail
    `torch.load(weights_only=True)` are retried with weights_only=False, tensor-subclass weights are
    loaded with weights_only=False, custom and opaque objects are unpickled, and AOTInductor
    packages are dlopen'ed. Here every torch.load is forced weights-only through torch's documented
    TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, and archives holding pickled objects or compiled code
    (quantcli never writes either) are refused before torch reads them.
    """
    from quantcli.errors import ArtifactError

    problem = _unsafe_entry(path)
    if problem is not None:
        raise ArtifactError(f"{path} holds {problem}; quantcli does not load it", "recreate it with quantcli")
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    quiet = logging.getLogger("torch.export")  # it logs a traceback before raising
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with _deserializer_caches():
            return torch.export.load(str(path))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ArtifactError(
            f"{path} cannot be loaded safely by this torch: {type(exc).__name__}: {first}",
            "recreate it with this version of quantcli and torch",
        ) from exc
    finally:
        quiet.setLevel(level)
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


class _TypingWithCachedHints(types.ModuleType):
    """The typing module, but get_type_hints answers each (class, namespaces) once."""

    def __init__(self) -> None:
        super().__init__("typing")
        self._hints: dict[tuple[Any, ...], Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(typing, name)

    def get_type_hints(self, obj: Any, globalns: Any = None, localns: Any = None, include_extras: bool = False):
        key = (obj, id(globalns), id(localns), include_extras)
        if key not in self._hints:
            self._hints[key] = typing.get_type_hints(obj, globalns, localns, include_extras)
        return self._hints[key]


class _SympyWithCachedParses(types.ModuleType):
    """The sympy module, but sympify answers each (text, the names it may read) once."""

    def __init__(self, sympy: types.ModuleType) -> None:
        super().__init__("sympy")
        self._sympy, self._parsed = sympy, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sympy, name)

    def sympify(self, a: Any, locals: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if not isinstance(a, str) or kwargs or not isinstance(locals, dict):
            return self._sympy.sympify(a, locals=locals, **kwargs)
        key = (a, frozenset(locals.items()))
        if key not in self._parsed:
            self._parsed[key] = self._sympy.sympify(a, locals=locals)
        return self._parsed[key]


@contextlib.contextmanager
def _deserializer_caches() -> Iterator[None]:
    """torch.export.load with its deserializer's type hints computed once per class, and each shape expression
    parsed once.

    The deserializer (torch._export.serde.serialize, private) asks typing.get_type_hints of a schema
    dataclass for every object it rebuilds. With each class's hints kept, loading a small EVA-02's
    converted program (2680 nodes) takes 4.8 s where it took 6.0, EfficientNet-Lite0's 0.66 s where it
    took 1.07. It also parses the text of every symbolic size of every node's value with sympy's parser
    (`s77`, `32*s77`: a handful of texts, each parsed hundreds of times; 2 % of the test suite's CPU time). A
    parse depends only on the text and the names it may read (the symbols already made, sympy's functions), so
    with those in the key each is kept; sympy's expressions are immutable. Only that module's `typing` and
    `sympy` are replaced, for the load alone.
    """
    from torch._export.serde import serialize

    if getattr(serialize, "typing", None) is not typing:  # another torch: as it is
        yield
        return
    with _replaced(serialize, "typing", _TypingWithCachedHints()):
        sympy = getattr(serialize, "sympy", None)
        if not isinstance(sympy, types.ModuleType) or not callable(getattr(sympy, "sympify", None)):
            yield
            return
        with _replaced(serialize, "sympy", _SympyWithCachedParses(sympy)):
            yield


def _unsafe_entry(path: Path) -> str | None:
    """What in a .pt2 archive torch.export.load would unpickle or execute, or None."""
    import json
    import zipfile

    from torch.export.pt2_archive import constants as pt2

    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                inner = name.split("/", 1)[-1]
                if inner.startswith((pt2.AOTINDUCTOR_DIR, pt2.EXECUTORCH_DIR, pt2.MTIA_DIR)):
                    return f"compiled code ({name})"
                if inner.endswith(("_weights_config.json", "_constants_config.json")):
                    config = json.loads(archive.read(name)).get("config", {})
                    for fqn, entry in config.items():
                        if entry.get("use_pickle") or not str(entry.get("path_name", "")).startswith(
                            (pt2.WEIGHT_FILENAME_PREFIX, pt2.TENSOR_CONSTANT_FILENAME_PREFIX)
                        ):
                            return f"a pickled object ({fqn} in {name})"
    except (zipfile.BadZipFile, ValueError, AttributeError, OSError) as exc:
        return f"no readable archive ({type(exc).__name__})"
    return None


def save_state(state: dict[str, Any], path: Path) -> None:
    """A state_dict or checkpoint, readable back with `load_state` (tensors, numbers, strings, containers)."""
    torch.save(state, path)


def load_state(path: Path) -> Any:
    """torch.load(weights_only=True): never unpickles code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def input_axes(module: Any) -> list[tuple[list[int | tuple[int, int | None]], Any]]:
    """(axes, dtype) of each input of a module made from an ExportedProgram (`program.module()`, prepared
    or not): an int for a static axis, (min, max) for a dynamic one, max None when unbounded."""
    specs = []
    for node in module.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if val is None or not hasattr(val, "shape"):
            continue
        specs.append(([d if isinstance(d, int) else _bounds(d) for d in val.shape], val.dtype))
    return specs


def _bounds(dim: Any) -> tuple[int, int | None]:
    found = dim.node.shape_env.var_to_range.get(dim.node.expr)
    if found is None:
        return 0, None
    unbounded = str(found.upper) in ("oo", "int_oo")  # sympy's and torch's infinities
    return int(found.lower), None if unbounded else int(found.upper)


def is_guard_failure(exc: BaseException) -> bool:
    """Whether `exc` is an exported module's own check of its inputs against the program's shapes."""
    text = str(exc)
    return text.startswith("Guard failed") or text.startswith("Expected input at")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


def prepare(module: Any, quantizer: Any, qat: bool) -> Any:
    _unfold_shared_convs(module)
    if not qat:
        return prepare_pt2e(module, quantizer)
    with _present_convs_only(), _traced_patterns_cached():
        return prepare_qat_pt2e(module, quantizer)


_BATCH_NORMS = ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")
_CONV_OPS = ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.conv_transpose1d", "aten.conv_transpose2d")


def _unfold_shared_convs(module: Any) -> int:
    """Keep torchao from folding a BatchNorm into a conv whose output other nodes read too; return how many.

    prepare_pt2e folds every conv -> BatchNorm pair into the conv's weights without looking at the conv's
    other users (torchao 0.18, quantization.pt2e.utils._fuse_conv_bn_), which then read normalized values:
    a conv feeding both a Concat and a pre-activation BatchNorm gave a wrong model. Such a BatchNorm reads
    a clone of the conv's output instead (an Identity in ONNX), which torchao does not fold through.
    """
    from quantcli.quantizers.graphpass import rewrite_each

    def rewrite(bn: Any, done: int) -> bool:
        conv = bn.args[0] if bn.op == "call_function" and str(bn.target) in _BATCH_NORMS else None
        if conv is None or not str(conv.target).startswith(_CONV_OPS) or len(conv.users) < 2:
            return False
        with module.graph.inserting_after(conv):
            clone = module.graph.call_function(torch.ops.aten.clone.default, (conv,))
        clone.meta.update(conv.meta)
        bn.replace_input_with(conv, clone)
        return True

    return rewrite_each(module, rewrite)


def convert(module: Any, fold_quantize: bool, reference_representation: bool = False) -> Any:
    with _present_convs_only(), _traced_patterns_cached():
        module = convert_pt2e(
            module, use_reference_representation=reference_representation, fold_quantize=fold_quantize
        )
    if not fold_quantize:
        # ONNX QuantizeLinear has no int32 output: int32 biases are folded even when weights stay float.
        constant_fold(module, _int32_quantize)
    return module


@contextlib.contextmanager
def _present_convs_only() -> Iterator[None]:
    """Skip torchao's conv-bn QAT fuse/fold passes for conv functions the graph does not call.

    prepare_qat_pt2e and convert_pt2e run one pass per conv function (conv1d, conv2d,
    conv_transpose1d/2d), each exporting its patterns with torch.export whether or not the graph
    has that conv: 96 exports, about 0.3 s each, in convert alone; QAT convert of the 8x8 digits
    CNN took 17-29 s. A pass cannot match where its conv op is absent, so skipping it changes
    nothing else. The helpers are private (torchao.quantization.pt2e.qat_utils) and the public
    API has no switch, hence this temporary patch of their module attributes.
    """
    aten = torch.ops.aten
    ops = {
        torch.nn.functional.conv1d: {aten.conv1d.default, aten.conv1d.padding},
        torch.nn.functional.conv2d: {aten.conv2d.default, aten.conv2d.padding},
        torch.nn.functional.conv_transpose1d: {aten.conv_transpose1d.default},
        torch.nn.functional.conv_transpose2d: {aten.conv_transpose2d.input},
    }
    originals = {name: getattr(_qat_utils, name) for name in ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")}

    def only_present(helper: Any) -> Any:
        def run(m: Any, conv_fn: Any, *args: Any, **kwargs: Any) -> Any:
            wanted = ops.get(conv_fn)
            if wanted is not None and not any(n.target in wanted for n in m.graph.nodes):
                return m
            return helper(m, conv_fn, *args, **kwargs)

        return run

    with contextlib.ExitStack() as stack:
        for name, helper in originals.items():
            stack.enter_context(_replaced(_qat_utils, name, only_present(helper)))
        yield


# The aten graphs of torchao's patterns this process has traced, by what each trace depends on (`_pattern_key`).
_TRACED_PATTERNS: dict[tuple[Any, ...], Any] = {}


@contextlib.contextmanager
def _traced_patterns_cached() -> Iterator[None]:
    """torchao's pattern tracing (`_get_aten_graph_module_for_pattern`) done once per pattern in a process.

    torchao's QAT and train/eval passes find conv-bn, dropout and batch-norm subgraphs by matching them against
    small functions, each traced with torch.export on every call: 50 traces, 10 of the 18 s of `quantcli run`
    on the bundled QAT recipe, where the QAT graph is prepared again by calibrate, train and convert. A trace
    depends only on the function (its code and the values it closes over) and the shapes and dtypes of its
    example inputs, so each caller gets a copy of the graph traced for the first. Patterns the key cannot name
    are traced on every call.

    torchao traces each pattern strictly (through dynamo's bytecode capture): a pattern is a few aten calls on its
    arguments, which the non-strict trace records as the same graph (nodes, names, arguments) in a quarter of the
    time (33 patterns of the bundled QAT recipe: 1.2 against 5.1 s, AMD EPYC, one thread); the strict trace only
    adds dynamo's own bookkeeping to each node's meta (`source_fn_stack`, `seq_nr`), which the matcher ignores.
    tests/test_qat.py compares the graphs with torchao's own traces; the QAT recipe's programs, states and ONNX
    file came out the same to the byte.
    """

    def traced(pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool = False, **kwargs: Any) -> Any:
        key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        if key is None:
            return _trace_pattern(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _TRACED_PATTERNS:
            _TRACED_PATTERNS[key] = _trace_pattern(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_TRACED_PATTERNS[key])

    # qat_utils and the reference representation's rewrite hold their own references; export_utils imports it from
    # utils at each call
    with contextlib.ExitStack() as stack:
        for module in (_pt2e_utils, _qat_utils, _reference_rewrite):
            stack.enter_context(_replaced(module, "_get_aten_graph_module_for_pattern", traced))
        yield


def _trace_pattern(pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool = False, **kwargs: Any) -> Any:
    """torchao's `_get_aten_graph_module_for_pattern` (torchao 0.18, quantization.pt2e.utils), traced non-strictly."""
    if is_cuda:
        example_inputs = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    graph_module = torch.export.export(pattern, example_inputs, kwargs, strict=False).module()
    for node in list(graph_module.graph.nodes):  # `module()` writes back mutated inputs: no part of a pattern
        if node.op == "call_function" and node.target is torch.ops.aten.copy_.default and not node.users:
            graph_module.graph.erase_node(node)
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


def _pattern_key(pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool, kwargs: dict[str, Any]) -> Any:
    """What a pattern's trace depends on: its function's code, defaults and closure values, and the shape and dtype
    of every input; None where a value is not hashable, where the function holds a tensor of its own (the trace
    bakes its values in) or the pattern is a module with state of its own (torchao wraps its pattern functions in a
    module holding only `fn`)."""
    function = pattern
    if isinstance(pattern, torch.nn.Module):
        function = getattr(pattern, "fn", None)
        if function is None or any(True for _ in pattern.parameters()) or any(True for _ in pattern.buffers()):
            return None
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    own = (*(cell.cell_contents for cell in function.__closure__ or ()), *(function.__defaults__ or ()))
    if any(isinstance(value, torch.Tensor) for value in own):
        return None

    def described(value: Any) -> Any:  # an input: the trace depends on its shape and dtype, not its values
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype, value.device.type)
        return value

    key = (
        type(pattern),
        code,
        own,
        tuple(described(x) for x in example_inputs),
        is_cuda,
        tuple(sorted((name, described(value)) for name, value in kwargs.items())),
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _int32_quantize(node: Any) -> bool:
    return (
        node.op == "call_function"
        and str(node.target).startswith("quantized_decomposed.quantize_per")
        and torch.int32 in node.args
    )


def prune_unused(module: Any) -> bool:
    """Drop parameters and buffers no get_attr node reads, under every name they have; True if any.

    convert leaves the fp32 weights behind; a captured model can hold unused submodules (a pooler
    whose output nobody reads) and tied weights registered under two names, of which the graph
    reads one.
    """
    used = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    state = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    unused = [name for name, _ in state if name not in used and not any(u.startswith(name + ".") for u in used)]
    for name in unused:
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if hasattr(owner, attr):  # a tied tensor may be listed twice under one owner
            delattr(owner, attr)
    if unused:
        module.delete_all_unused_submodules()
    module.graph.lint()
    module.recompile()
    return bool(unused)


def without_dead_state(program: Any, args: tuple, dynamic_shapes: Any) -> Any:
    """The captured program with no dead nodes, no unused parameters or buffers and no weight aliases.

    Later stages re-run prepare in a new process and load the state saved by the one before
    strictly; torchao's eval/train switch deletes submodules no node reads, so anything unused
    would exist in one process's module and not in the saved state. Resolving it here, once,
    before anything is saved, makes every stage see the same module. Dead nodes and the parameters
    and buffers nothing reads (every BatchNorm's num_batches_tracked in eval mode) are dropped from
    the program itself; it is re-exported (a second trace, as long as the first) only when its
    module still holds something unused, such as a weight alias.
    """
    program = _without_unused_inputs(program)
    module = program.module()
    dead = module.graph.eliminate_dead_code()
    if not prune_unused(module) and not dead:
        return program
    return export_program(module, args, dynamic_shapes)


def _without_unused_inputs(program: Any) -> Any:
    """`program` without dead nodes and without the parameters, buffers and constants no node reads."""
    from torch.export.graph_signature import ExportGraphSignature, InputKind

    graph = program.graph_module.graph
    graph.eliminate_dead_code()
    lifted = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    unused = [
        (node, spec)
        for node, spec in zip(placeholders, program.graph_signature.input_specs)
        if spec.kind in lifted and not node.users
    ]
    if not unused:
        return program
    targets = {spec.target for _, spec in unused}
    for node, _ in unused:
        graph.erase_node(node)
    program.graph_module.recompile()
    signature = ExportGraphSignature(
        input_specs=[s for s in program.graph_signature.input_specs if s.kind not in lifted or s.target not in targets],
        output_specs=program.graph_signature.output_specs,
    )
    return program._update(  # private: torch's own passes build their modified programs with it
        program.graph_module,
        signature,
        state_dict={k: v for k, v in program.state_dict.items() if k not in targets},
        constants={k: v for k, v in program.constants.items() if k not in targets},
    )


def to_train(module: Any, bn_frozen: bool = False) -> Any:
    """Dropout and batch norm in training mode; batch norm stays on running stats if `bn_frozen`.

    torchao's switch rewrites every batch-norm node to training=True, undoing a freeze, so the
    freeze is re-applied here after it.
    """
    with _traced_patterns_cached():
        move_exported_model_to_train(module)
    if bn_frozen:
        freeze_bn(module)
    return module


def to_eval(module: Any) -> Any:
    """torchao's `move_exported_model_to_eval`, rewriting only the nodes still in training mode.

    torchao switches dropout and batch norm to eval mode by subgraph matching, and builds each pattern
    by exporting a small function: 18 exports, 5 s of a typical pipeline, spent even when every node is
    already in eval mode (a model captured in eval mode). Its rewrite also resets batch norm's eps to
    the default; a node left alone keeps the model's own.
    """
    if not getattr(module, _export_utils._EXPORTED_TRAINING_ATTR, True):
        return module
    setattr(module, _export_utils._EXPORTED_TRAINING_ATTR, False)
    dropout = (torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default)
    with _traced_patterns_cached():
        if any(n.op == "call_function" and n.target in dropout and n.args[2] is not False for n in module.graph.nodes):
            _export_utils._replace_dropout(module, train_to_eval=True)
        if any(n.args[5] is not False for n in _bn_nodes(module)):
            _export_utils._replace_batchnorm(module, train_to_eval=True)
    return module


# Batch-norm ops whose args[5] is the `training` flag (torch.ops.aten schemas); the flag is graph
# state, not in the state_dict.
def _bn_nodes(module: Any) -> list[Any]:
    aten = torch.ops.aten
    targets = {aten.batch_norm.default, aten._native_batch_norm_legit.default, aten.cudnn_batch_norm.default}
    return [n for n in module.graph.nodes if n.op == "call_function" and n.target in targets]


def freeze_bn(module: Any) -> Any:
    """Batch norm normalizes with, and stops updating, its running statistics (a training-mode switch).

    The PT2E QAT recipe: set `training=False` on the batch-norm nodes of the fused conv-bn graph.
    """
    for node in _bn_nodes(module):
        if node.args[5] is not False:
            node.args = (*node.args[:5], False, *node.args[6:])
    module.recompile()
    return module


def bn_buffers(module: Any) -> list[Any]:
    """The running mean and variance tensors read by the graph's batch-norm nodes."""
    names = []
    for node in _bn_nodes(module):
        for arg in node.args[3:5]:
            if getattr(arg, "op", None) == "get_attr" and arg.target not in names:
                names.append(arg.target)
    return [module.get_buffer(name) for name in names]


def fake_quantizers(module: Any) -> list[Any]:
    return [m for m in module.modules() if isinstance(m, FakeQuantizeBase)]


def disable_observers(module: Any) -> Any:
    """Freeze quantization ranges: fake quantization goes on with the last computed scales."""
    module.apply(disable_observer)
    return module


def observers_frozen(module: Any) -> bool:
    return all(int(fq.observer_enabled[0]) == 0 for fq in fake_quantizers(module))


def refresh_qparams(fq: Any) -> None:
    """Recompute a FakeQuantize's scale and zero point from its observer (as its forward does)."""
    scale, zero_point = fq.calculate_qparams()
    if fq.scale.shape != scale.shape:
        fq.scale.resize_(scale.shape)
        fq.zero_point.resize_(zero_point.shape)
    fq.scale.copy_(scale.to(fq.scale.device))
    fq.zero_point.copy_(zero_point.to(fq.zero_point.device))


def ddp(module: Any, device_ids: list[int] | None) -> Any:
    """DistributedDataParallel that averages gradients but leaves buffers (BN, observers) per rank.

    They are synced at init (every rank starts from the same state) and reconciled by quantcli at
    its sync points. `forward_sync_buffers` replaced `broadcast_buffers` in torch 2.13.
    """
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
