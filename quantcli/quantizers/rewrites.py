"""Graph rewrites before annotation that give ONNX Runtime integer forms to ops it would run in float.

- SiLU/Swish exports as Sigmoid then Mul; written out as x * sigmoid(x) here, both get quantized
  (QLinearSigmoid, QLinearMul) instead of sitting between a DequantizeLinear and a QuantizeLinear.
  Hardswish likewise becomes x * hardsigmoid(x): ORT has no integer HardSigmoid (it stays float, its
  output quantized), but the Mul becomes a QLinearMul, where ORT ran the whole HardSwish in float.
- A BatchNorm that follows no conv (DenseNet's pre-activation after a Concat, a RepVGG block's identity
  branch; prepare folds every conv's own BN before this runs) becomes the depthwise 1x1 conv that
  computes it, x * gamma / sqrt(var + eps) + (beta - mean * gamma / sqrt(var + eps)): ORT runs it as a
  QLinearConv, where ORT's own quantizer leaves the BatchNormalization float between Q/DQ. PTQ only
  (QAT trains BatchNorm statistics).
- adaptive_avg_pool to size 1 becomes a mean over the spatial dims: the same values, exported
  as ReduceMean (quantcli.onnx.rewrite turns it into GlobalAveragePool) and never as the
  as_strided copy the pool's decomposition adds for channels-last inputs.
- A multiplication by a per-channel constant or a scalar right after a Linear/Conv (ConvNeXt's
  layer scale, a query scaling) is folded into that layer's weight and bias.

Each rewrite is a pure function of the graph and its weights, so prepare in another process
builds the same nodes, buffers and state_dict keys. They touch only nodes `wanted(node)` accepts
(the quantization policy), so excluded modules keep their captured ops.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch.fx import GraphModule, Node

from quantcli.quantizers.graphpass import call_like, replace, rewrite_each
from quantcli.quantizers.patterns import value

aten = torch.ops.aten
# x * gate(x) activations, by the gate they are written out with
_GATED = {
    aten.silu.default: aten.sigmoid.default,
    aten.silu_.default: aten.sigmoid.default,
    aten.hardswish.default: aten.hardsigmoid.default,
    aten.hardswish_.default: aten.hardsigmoid.default,
}
_ADAPTIVE = {aten.adaptive_avg_pool1d.default: [-1], aten.adaptive_avg_pool2d.default: [-2, -1]}
_PERMUTES = (aten.permute.default, aten.transpose.int)
_CONVS = {3: aten.conv1d.default, 4: aten.conv2d.default, 5: aten.conv3d.default}  # by input rank
_FOLD_INTO = (aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


def get_attr_value(model: GraphModule, node) -> torch.Tensor | None:
    """The tensor a get_attr node reads, or None."""
    if not (isinstance(node, Node) and node.op == "get_attr"):
        return None
    obj = model
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def set_parameter(model: GraphModule, target: str, new: torch.Tensor) -> None:
    """Replace the parameter at `target` by a new Parameter holding `new` (the captured one is untouched)."""
    owner_path, _, name = target.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    setattr(owner, name, torch.nn.Parameter(new, requires_grad=getattr(owner, name).requires_grad))


def decompose_gates(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """silu(x) -> x * sigmoid(x), hardswish(x) -> x * hardsigmoid(x) (equal up to float rounding); how many."""

    def rewrite(node: Node, done: int) -> bool:
        if node.op != "call_function" or node.target not in _GATED or not wanted(node):
            return False
        x, gate = node.args[0], _GATED[node.target]
        with model.graph.inserting_before(node):
            sig = call_like(model.graph, node, gate, (x,), gate(value(x)))
            mul = call_like(model.graph, node, aten.mul.Tensor, (x, sig), node.meta["val"])
        replace(model.graph, node, mul)
        return True

    return rewrite_each(model, rewrite)


def norms_to_convs(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """batch_norm(x) in eval mode on an (N, C, ...) activation -> the depthwise 1x1 conv computing it; how many.

    The conv's weight and bias are new parameters, `_quantcli_norm_<k>_weight`/`_bias` in graph order,
    so prepare in another process makes the same state_dict keys.
    """

    def rewrite(node: Node, done: int) -> bool:
        if node.op != "call_function" or node.target is not aten.batch_norm.default or not wanted(node):
            return False
        affine = _norm_as_affine(model, node)
        if affine is None:
            return False
        scale, shift = affine
        rank = value(node.args[0]).dim()
        weight, bias = f"_quantcli_norm_{done}_weight", f"_quantcli_norm_{done}_bias"
        model.register_parameter(weight, torch.nn.Parameter(scale.reshape(-1, *(1,) * (rank - 1)), False))
        model.register_parameter(bias, torch.nn.Parameter(shift, False))
        with model.graph.inserting_before(node):
            w, b = model.graph.get_attr(weight), model.graph.get_attr(bias)
            w.meta["val"], b.meta["val"] = model.get_parameter(weight), model.get_parameter(bias)
            spatial = rank - 2
            args = (node.args[0], w, b, [1] * spatial, [0] * spatial, [1] * spatial, scale.numel())
            conv = call_like(model.graph, node, _CONVS[rank], args, node.meta["val"])
        replace(model.graph, node, conv)
        return True

    return rewrite_each(model, rewrite)


def _norm_as_affine(model: GraphModule, node: Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) per channel of an eval-mode batch_norm with running statistics, else None."""
    x, gamma, beta, mean, var, training, _, eps = node.args[:8]
    val = value(x)
    if training or val is None or val.dim() not in _CONVS or not isinstance(val.shape[1], int):
        return None
    mean, var = get_attr_value(model, mean), get_attr_value(model, var)
    if mean is None or var is None or mean.numel() != val.shape[1]:
        return None
    with torch.no_grad():
        scale = torch.rsqrt(var.double() + eps)
        if gamma is not None:
            scale = scale * get_attr_value(model, gamma).double()
        shift = -mean.double() * scale
        if beta is not None:
            shift = shift + get_attr_value(model, beta).double()
    return scale.to(val.dtype), shift.to(val.dtype)


def pools_to_means(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """adaptive_avg_pool{1,2}d(x, 1) -> x.mean(spatial dims, keepdim=True); return how many."""

    def rewrite(node: Node, done: int) -> bool:
        dims = _ADAPTIVE.get(node.target) if node.op == "call_function" else None
        if dims is None or any(s != 1 for s in node.args[1]) or not wanted(node):
            return False
        with model.graph.inserting_before(node):
            mean = call_like(model.graph, node, aten.mean.dim, (node.args[0], dims, True), node.meta["val"])
        replace(model.graph, node, mean)
        return True

    return rewrite_each(model, rewrite)


def fold_channel_scales(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """mul(permute*(linear/conv(x)), c) -> permute*(linear/conv'(x)) with the weight rows times c.

    `c` is a scalar or a constant varying only along the layer's output channels as they appear at
    the mul (through permutes/transposes). The layer, its weight and bias must have no other users.
    """

    def rewrite(node: Node, done: int) -> bool:
        if node.op != "call_function" or node.target is not aten.mul.Tensor or not wanted(node):
            return False
        found = _scaled_layer(model, node)
        if found is None or not wanted(found[0]):
            return False
        layer, scales, y = found
        _scale_layer(model, layer, scales)
        replace(model.graph, node, y)
        return True

    return rewrite_each(model, rewrite)


def _scaled_layer(model: GraphModule, mul: Node):
    """(layer, per-channel scales, the mul's other operand) when `mul` can be folded, else None."""
    for y, c in (mul.args[:2], mul.args[1::-1]):
        constant = get_attr_value(model, c) if isinstance(c, Node) else None
        if not isinstance(y, Node) or (constant is None and not isinstance(c, numbers.Real)) or isinstance(c, bool):
            continue
        layer, axis = _producer(y)
        if layer is None:
            continue
        scales = _channel_vector(constant if constant is not None else float(c), value(y), axis)
        if scales is not None and _foldable_weights(model, layer):
            return layer, scales, y
    return None


def _producer(y: Node) -> tuple[Node | None, int]:
    """The single-use Linear/Conv behind `y` (through single-use permutes) and the axis of y holding its channels."""
    chain = []
    node = y
    while node.op == "call_function" and node.target in _PERMUTES and len(node.users) == 1:
        chain.append(node)
        node = node.args[0]
    if not (
        isinstance(node, Node)
        and node.op == "call_function"
        and node.target in _FOLD_INTO
        and len(node.users) == 1
        and value(node) is not None
    ):
        return None, 0
    axis = value(node).dim() - 1 if node.target is aten.linear.default else 1
    for step in reversed(chain):  # follow the channel axis forwards to y
        rank = value(step).dim()
        if step.target is aten.permute.default:
            axis = [d % rank for d in step.args[1]].index(axis)
        else:
            a, b = (d % rank for d in step.args[1:3])
            axis = b if axis == a else a if axis == b else axis
    return node, axis


def _channel_vector(c, y: torch.Tensor, axis: int) -> torch.Tensor | None:
    """c as one scale per channel of y's `axis`, or None when it varies along another axis."""
    channels = y.shape[axis]
    if not isinstance(channels, int):
        return None
    if not isinstance(c, torch.Tensor):
        return torch.full((channels,), float(c), dtype=y.dtype)
    if c.dim() > y.dim() or c.dtype != y.dtype:
        return None
    full = c.detach().reshape((1,) * (y.dim() - c.dim()) + tuple(c.shape))
    varying = [d for d in range(full.dim()) if full.shape[d] != 1]
    if varying not in ([], [axis]) or (varying and full.shape[axis] != channels):
        return None
    return full.reshape(-1).expand(channels).clone()


def _foldable_weights(model: GraphModule, layer: Node) -> bool:
    """Weight (and bias) are parameters read only by this layer (not tied to another one)."""
    params = [a for a in layer.args[1:3] if a is not None]
    if not all(isinstance(p, Node) and p.op == "get_attr" and len(p.users) == 1 for p in params):
        return False
    mine = {get_attr_value(model, p).untyped_storage().data_ptr() for p in params}
    others = [get_attr_value(model, n) for n in model.graph.nodes if n.op == "get_attr" and n not in params]
    return not any(t is not None and t.untyped_storage().data_ptr() in mine for t in others)


def _scale_layer(model: GraphModule, layer: Node, scales: torch.Tensor) -> None:
    weight = layer.args[1]
    w = get_attr_value(model, weight)
    set_parameter(model, weight.target, w.detach() * scales.reshape((-1,) + (1,) * (w.dim() - 1)))
    bias = layer.args[2] if len(layer.args) > 2 else None
    if isinstance(bias, Node):
        set_parameter(model, bias.target, get_attr_value(model, bias).detach() * scales)
