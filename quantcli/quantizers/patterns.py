"""Which aten ops the onnxruntime target quantizes, by kind, and the graph predicates it decides with.

A kind names what ONNX Runtime makes of the op once its inputs (and output) carry Q/DQ: an
integer kernel (conv, linear, addmm, matmul: QLinearConv, QGemm, QLinearMatMul...; binary:
QLinearAdd/QLinearMul; cat: QLinearConcat; pool: QLinearAveragePool/QLinearGlobalAveragePool;
unary: QLinearSigmoid/QLinearLeakyRelu), or an op it runs directly on uint8 once it drops the Q/DQ
around it, which needs the output to share the input's parameters (shared; split and its getitems).
An embedding (a Gather from a weight) gets int8 rows: quantcli.onnx.rewrite gathers them before
scaling them, so the table stays int8 in memory and on disk.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

aten = torch.ops.aten

_OPS = {
    "conv": (
        aten.conv1d.default,
        aten.conv2d.default,
        aten.conv3d.default,
        aten.conv1d.padding,
        aten.conv2d.padding,
        aten.conv3d.padding,
    ),
    "conv_transpose": (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input),
    "linear": (aten.linear.default,),
    "addmm": (aten.addmm.default,),  # bias + x @ W with W (in, out): GPT-2's Conv1D
    "embedding": (aten.embedding.default,),
    "matmul": (aten.matmul.default, aten.bmm.default, aten.mm.default),
    "binary": (aten.add.Tensor, aten.add_.Tensor, aten.mul.Tensor, aten.mul_.Tensor),
    "relu": (aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default),
    "cat": (aten.cat.default, aten.concat.default, aten.stack.default),
    "pool": (
        aten.avg_pool1d.default,
        aten.avg_pool2d.default,
        aten.adaptive_avg_pool1d.default,
        aten.adaptive_avg_pool2d.default,
        aten.mean.dim,
    ),
    "unary": (aten.sigmoid.default, aten.sigmoid_.default, aten.leaky_relu.default, aten.leaky_relu_.default),
    "split": (
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.chunk.default,
        aten.unbind.int,
        aten.tensor_split.sections,
    ),
    "getitem": (operator.getitem,),
    # the output keeps the input's quantization parameters; ORT runs these on uint8 (Pad through
    # quantcli.onnx.rewrite, which gives it the zero point as its constant)
    "shared": (
        aten.max_pool1d.default,
        aten.max_pool2d.default,
        aten.reshape.default,
        aten.view.default,
        aten.flatten.using_ints,
        aten.unflatten.int,
        aten.permute.default,
        aten.transpose.int,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.unsqueeze.default,
        aten.expand.default,
        aten.contiguous.default,
        aten.clone.default,
        aten.alias.default,
        aten.upsample_nearest1d.vec,
        aten.upsample_nearest2d.vec,
        aten.dropout.default,
        aten.dropout_.default,
        aten.slice.Tensor,
        aten.select.int,
        aten.narrow.default,
        aten.roll.default,
        aten.pad.default,
        aten.constant_pad_nd.default,
    ),
}
KIND = {op: kind for kind, ops in _OPS.items() for op in ops}
BATCH_NORM = {
    aten.batch_norm.default,
    aten._native_batch_norm_legit_no_training.default,
    aten._native_batch_norm_legit.default,
}
UNIT_RANGE = {aten.hardsigmoid.default, aten.hardsigmoid_.default}  # outputs in [0, 1] whatever the input
WEIGHTED = ("conv", "conv_transpose", "linear", "addmm", "matmul")
PADS = (aten.pad.default, aten.constant_pad_nd.default)
# Ops that compute a weight from parameters without data (weight norm, a transposed or reshaped weight).
_WEIGHT_OPS = {
    aten._weight_norm.default,
    aten._weight_norm_interface.default,
    operator.getitem,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.t.default,
    aten.transpose.int,
    aten.permute.default,
    aten.reshape.default,
    aten.view.default,
    aten.norm.ScalarOpt_dim,
    aten.linalg_vector_norm.default,
    aten.pow.Tensor_Scalar,
    aten.sum.dim_IntList,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.detach.default,
    aten.to.dtype,
}


def value(arg) -> torch.Tensor | None:
    val = arg.meta.get("val") if isinstance(arg, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def is_float(arg) -> bool:
    val = value(arg)
    return val is not None and val.dtype.is_floating_point


def is_constant(arg, _depth: int = 0) -> bool:
    """A float tensor computed from parameters and buffers only (a weight, or a weight-normed weight)."""
    if not isinstance(arg, Node) or _depth > 16:
        return False
    if arg.op == "get_attr":
        return True
    if arg.op != "call_function" or arg.target not in _WEIGHT_OPS:
        return False
    inputs = [a for a in arg.all_input_nodes]
    return bool(inputs) and all(is_constant(a, _depth + 1) for a in inputs)


def is_activation(arg) -> bool:
    """A float tensor that depends on the model's inputs."""
    return is_float(arg) and not is_constant(arg)


def is_weight(arg) -> bool:
    return is_float(arg) and is_constant(arg)


def nonnegative(node: Node) -> bool:
    """The output of a ReLU, or of a hardtanh clamping at 0 or above (ReLU6)."""
    if node.op != "call_function" or KIND.get(node.target) != "relu":
        return False
    low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
    return node.target in (aten.relu.default, aten.relu_.default) or low >= 0


def only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def pad_arguments(node: Node) -> tuple[list, str, float]:
    """(pad list, mode, value) of aten.pad / aten.constant_pad_nd."""
    if node.target is aten.constant_pad_nd.default:
        value_ = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        return list(node.args[1]), "constant", value_
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value_ = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    return list(node.args[1]), mode, 0.0 if value_ is None else value_


def is_zero_pad(node: Node) -> bool:
    """A constant pad with value 0 and non-negative integer widths (so uint8 padding is exact)."""
    if node.target not in PADS:
        return False
    pads, mode, fill = pad_arguments(node)
    return mode == "constant" and fill == 0 and all(isinstance(p, int) and p >= 0 for p in pads)


def absorbed_pad(conv: Node) -> Node | None:
    """The zero pad of spatial dims feeding only `conv`, which ORT folds into QLinearConv, or None.

    TF-style "same" padding (EfficientNet-Lite, timm's tf_* models) pads asymmetrically before a
    strided or depthwise conv; aten.conv2d cannot express that, but ORT folds DQ -> Pad -> Conv -> Q
    into one QLinearConv when nothing stands between Pad and Conv. F.pad's list pads the last dims
    first, so at most 2 x (rank - 2) entries touch only spatial dims.
    """
    pad = conv.args[0]
    if not (isinstance(pad, Node) and pad.op == "call_function" and pad.target in PADS and len(pad.users) == 1):
        return None
    x = value(pad.args[0])
    pads, _, _ = pad_arguments(pad)
    if x is None or not is_zero_pad(pad) or len(pads) > 2 * (x.dim() - 2):
        return None
    return pad


def spatial_mean(node: Node) -> bool:
    """aten.mean.dim over every spatial dim of an (N, C, ...) tensor: a global average pool."""
    x = value(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else None
    if x is None or x.dim() < 3 or not dims:
        return False
    return sorted(d % x.dim() for d in dims) == list(range(2, x.dim()))


def global_pool(node: Node) -> bool:
    """An adaptive average pool to size 1 (ORT: GlobalAveragePool) or a spatial mean."""
    if node.target is aten.mean.dim:
        return spatial_mean(node)
    if node.target in (aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default):
        return all(s == 1 for s in node.args[1])
    return True  # avg_pool1d/2d: QLinearAveragePool


def split_source(getitem: Node) -> Node | None:
    """The split/chunk/unbind a getitem reads from, if it is one."""
    source = getitem.args[0]
    return source if isinstance(source, Node) and KIND.get(source.target) == "split" else None


def positive_scalar(node: Node) -> float | None:
    """c for x * c with x an activation and c a positive Python number (aten.mul.Tensor), else None."""
    if node.target not in (aten.mul.Tensor, aten.mul_.Tensor) or len(node.args) < 2:
        return None
    x, c = node.args[:2]
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0 or not isinstance(x, Node):
        return None
    return float(c) if is_activation(x) else None
