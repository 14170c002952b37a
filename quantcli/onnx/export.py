"""ONNX export of a converted program: the dynamo exporter, opset, checker, shape inference, metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantcli.errors import ModelError, RecipeError
from quantcli.onnx import biases, rewrite
from quantcli.onnx.graph import FLOAT_TYPES, Graph, insert, opset_of

EXPORTER_OPSET = 18  # the dynamo exporter's lowest opset; lower ones go through the version converter


def to_onnx(
    program: Any,
    *,
    opset: int,
    input_names: list[str],
    output_names: list[str],
    integer_rewrites: bool = True,
    translations: dict[str, Any] | None = None,
) -> Any:
    """Export with torch.onnx (dynamo) and return the onnx.ModelProto at the requested opset.

    `integer_rewrites=False` leaves out quantcli.onnx.rewrite, which serves quantized activations: on a float
    graph its GlobalAveragePool in place of an RMS norm's ReduceMean keeps ORT from fusing the norm.
    `translations` maps quantcli's own torch ops ("namespace::name") to the ONNX functions that write them."""
    from quantcli._torch import exporter

    try:
        onnx_program = exporter.onnx_program(
            program,
            opset=max(opset, EXPORTER_OPSET),
            input_names=input_names,
            output_names=output_names,
            translations=translations,
        )
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "out_dtype" in str(exc):
            raise ModelError(
                "the converted graph cannot be exported to ONNX (out_dtype has no ONNX conversion)",
                "convert without --reference-representation",
            ) from exc
        raise ModelError(f"ONNX export failed: {type(exc).__name__}: {first}") from exc
    model = onnx_program.model_proto
    if integer_rewrites:
        model = rewrite.rewrite(model)  # integer forms ORT can run (GlobalAveragePool...)
    return convert_opset(model, opset) if opset < EXPORTER_OPSET else model


def convert_opset(model: Any, opset: int) -> Any:
    """Down-convert with onnx.version_converter and check the result; a failure is an error."""
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, opset)
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RecipeError(
            f"export.opset {opset}: the model cannot be converted from opset {EXPORTER_OPSET}: {first}",
            f"use --opset {EXPORTER_OPSET} or higher",
        ) from exc
    if opset_of(converted) != opset:
        raise RecipeError(f"export.opset {opset}: the converter produced opset {opset_of(converted)}")
    return converted


# The node metadata quantcli keeps (everything else the exporter writes is dropped): where a node came from, as
# one entry "module|class|op", e.g. "features.3.block.1|Conv2dNormActivation|aten.conv2d.default": the innermost
# nn.Module's path (empty at the root), its class name, the torch op (empty for quantize/dequantize nodes).
ORIGIN_KEY = "quantcli.origin"


def origin(node: Any) -> dict[str, str]:
    """{"module", "module_type", "torch_op"} of an exported node (empty strings where it carries none)."""
    value = next((p.value for p in node.metadata_props if p.key == ORIGIN_KEY), "")
    module, module_type, op = ([""] * 2 + value.rsplit("|", 2))[-3:]
    return {"module": module, "module_type": module_type, "torch_op": op}


def exported_origin(node: Any) -> str:
    """The ORIGIN_KEY value of a node fresh from the exporter, from its debug metadata ("" where it has none).

    The exporter writes `pkg.torch.onnx.name_scopes` (every enclosing module path, then the FX node's
    name) and `pkg.torch.onnx.class_hierarchy` (their classes, then the torch op) as Python list
    literals. Quantize/dequantize nodes carry no module and need no op: their ONNX op type says it.
    """
    import ast

    props = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
        classes = ast.literal_eval(props.get("pkg.torch.onnx.class_hierarchy", "[]"))
    except (ValueError, SyntaxError):
        return ""
    if not (isinstance(scopes, list) and isinstance(classes, list)) or len(classes) < 1:
        return ""
    op = "" if str(classes[-1]).startswith("quantized_decomposed.") else str(classes[-1])
    module = module_type = ""
    if len(scopes) >= 2 and len(classes) == len(scopes) and scopes[-2]:
        module, module_type = str(scopes[-2]), str(classes[-2]).rsplit(".", 1)[-1]
    return f"{module}|{module_type}|{op}" if module or op else ""


def strip_node_metadata(model: Any) -> None:
    """Replace the exporter's per-node debug metadata with the node's origin (module, class, op) on the nodes
    that compute a float tensor.

    The debug metadata (stack traces, FX node text, every enclosing scope) held 60 % of the bytes of
    a small model and absolute paths of the machine that exported it. What is kept (`exported_origin`)
    is short, machine-independent and maps each node to the module it came from: the float-island
    report and per-layer reports name modules with it. Nodes whose outputs are all integers (shape
    arithmetic, moves of quantized tensors) name nothing those reports show, and keep none.
    """
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    for node in model.graph.node:
        value = exported_origin(node)
        del node.metadata_props[:]
        if value and any(types.get(out, 1) in FLOAT_TYPES for out in node.output):  # unknown: kept
            entry = node.metadata_props.add()
            entry.key, entry.value = ORIGIN_KEY, value
    del model.graph.metadata_props[:]  # the ExportedProgram's signature (NF-ResNet-26: 7.8 KB)
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        del value.metadata_props[:]
    for tensor in model.graph.initializer:
        del tensor.metadata_props[:]


def tidy(model: Any) -> None:
    """The exported model as quantcli writes it: node origins only (`strip_node_metadata`), one initializer for
    each distinct constant, int32 biases in the bytes ORT reads (quantcli.onnx.biases), float constants that
    float16 holds exactly stored as float16 (`half_constants`), and value_info for the tensors nodes compute only.

    torch.export lifts a constant once for each block that makes it (a rotary table, a layer's shared
    scale), and the exporter records a value_info for every initializer, which carries its own type and
    shape: 33 KB of EVA-02's 6.0 MB, 6 KB of ConvNeXt-atto's 3.8 MB, a file larger than ORT's.
    """
    strip_node_metadata(model)
    share_constants(model)
    biases.compact(model)
    half_constants(model)
    computed = {out for node in model.graph.node for out in node.output} - {o.name for o in model.graph.output}
    kept = [v for v in model.graph.value_info if v.name in computed]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def share_constants(model: Any) -> int:
    """Initializers equal to an earlier one (dtype, shape and bytes) removed, their readers pointed at that one
    (in subgraphs too); how many. Only tensors held in the model (not external data), and no graph input or
    output, are merged."""
    import hashlib

    import onnx

    graph = model.graph
    inputs = {i.name for i in graph.input} | {o.name for o in graph.output}
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}  # keyed by a digest: no second copy of the weights
    alias: dict[str, str] = {}
    repeats = []
    for index, tensor in enumerate(graph.initializer):
        if tensor.name in inputs or not tensor.HasField("raw_data"):
            continue
        key = (tensor.data_type, tuple(tensor.dims), hashlib.blake2b(tensor.raw_data, digest_size=32).digest())
        if key in first:
            alias[tensor.name] = first[key]
            repeats.append(index)
        else:
            first[key] = tensor.name
    for index in reversed(repeats):  # in place: the other tensors are not copied
        del graph.initializer[index]
    graphs = [graph] if alias else []
    while graphs:
        for node in graphs.pop().node:
            for i, name in enumerate(node.input):
                if name in alias:
                    node.input[i] = alias[name]
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attribute.graphs)
    return len(alias)


HALF_MIN_SIZE = 256  # a float32 constant this large or larger is stored as float16 where that is exact


def half_constants(model: Any) -> int:
    """float32 initializers whose every value float16 holds exactly (the FFN equalization's scales, weights trained
    in half precision) stored as float16 behind a Cast to float32, half the bytes; how many.

    ORT folds the Cast when it loads the model: the graph it optimizes and every value are as they were. Not the
    parameters of a QuantizeLinear or DequantizeLinear, which stay as the quantizer wrote them.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    g = Graph(graph)
    kept = g.outputs | {i.name for i in graph.input}
    kept |= {i for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
    casts = []
    for tensor in graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or tensor.name in kept or not tensor.HasField("raw_data"):
            continue
        value = numpy_helper.to_array(tensor)
        if value.size < HALF_MIN_SIZE or not np.array_equal(value.astype(np.float16).astype(np.float32), value):
            continue
        name, half = tensor.name, g.fresh(f"{tensor.name}_float16")
        tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float16), half))
        casts.append(helper.make_node("Cast", [half], [name], name=g.fresh(f"{name}_cast"), to=TensorProto.FLOAT))
    insert(graph, casts)  # first, so every reader comes after it
    return len(casts)


def rename_dims(model: Any, inputs: list[Any]) -> None:
    """Give symbolic dimensions the recipe's names (batch, seq, ...) instead of the exporter's s0, s1."""
    mapping: dict[str, str] = {}
    by_name = {spec.name: spec for spec in inputs}
    for value in model.graph.input:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and axis in spec.axes():
                mapping.setdefault(dim.dim_param, spec.axes()[axis])
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]


def infer_shapes(model: Any) -> Any:
    """Strict ONNX shape inference with data propagation; the result is stored in the model."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"ONNX shape inference failed: {first}") from exc


def shape_coverage(model: Any) -> dict[str, int]:
    """How many intermediate tensors carry a value_info with dtype and full shape."""
    typed = {
        v.name
        for v in model.graph.value_info
        if v.type.tensor_type.elem_type
        and v.type.tensor_type.HasField("shape")
        and all(d.dim_param or d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)
    }
    outputs = {o.name for o in model.graph.output}
    produced = {out for node in model.graph.node for out in node.output if out and out not in outputs}
    return {"intermediate": len(produced), "with_shape": len(produced & typed)}


def check(model: Any) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"the exported ONNX model fails onnx.checker: {first}") from exc


def set_metadata(model: Any, fields: dict[str, Any]) -> None:
    del model.metadata_props[:]
    for key, value in sorted(fields.items()):
        entry = model.metadata_props.add()
        entry.key = f"quantcli.{key}"
        entry.value = json.dumps(value, sort_keys=True)


def read_metadata(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        p.key.removeprefix("quantcli."): json.loads(p.value)
        for p in model.metadata_props
        if p.key.startswith("quantcli.")
    }


def graph_summary(model: Any) -> dict[str, Any]:
    """Op counts, quantized initializers and opset of an ONNX model."""
    from onnx import TensorProto

    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    int8 = [t for t in model.graph.initializer if t.data_type in (TensorProto.INT8, TensorProto.UINT8)]
    return {
        "opset": opset_of(model),
        "nodes": len(model.graph.node),
        "ops": dict(sorted(ops.items())),
        "int8_initializers": len(int8),
        "initializers": len(model.graph.initializer),
    }


def io_summary(model: Any) -> dict[str, list[dict[str, Any]]]:
    """The model's inputs and outputs as the file names them: name, element type and shape
    (symbolic dimensions by name, e.g. batch, seq)."""
    initializers = {t.name for t in model.graph.initializer}

    def describe(value: Any) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
        return {"name": value.name, "dtype": _dtype_name(tensor.elem_type), "shape": dims}

    return {
        "inputs": [describe(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [describe(v) for v in model.graph.output],
    }


def _dtype_name(elem_type: int) -> str:
    """numpy's name for an ONNX element type (float32, int64, ...), as the recipe spells dtypes."""
    from onnx import TensorProto, helper

    try:
        return helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, TypeError, ValueError):
        return TensorProto.DataType.Name(elem_type).lower()
