"""Graph rewrites before annotation that give ONNX Runtime integer forms to ops it would run in float.

- SiLU/Swish exports as Sigmoid then Mul; written out as x * sigmoid(x) here, both get quantized
  (QLinearSigmoid, QLinearMul) instead of sitting between a DequantizeLinear and a QuantizeLinear.
  Hardswish likewise becomes x * hardsigmoid(x), the gate quantized on [0, 1]: the Mul becomes a
  QLinearMul, and the export writes the gate as a requantizing Add (quantcli.onnx.rewrite), where ORT
  ran the whole HardSwish in float.
- A BatchNorm that follows no conv (DenseNet's pre-activation after a Concat, a RepVGG block's identity
  branch; prepare folds every conv's own BN before this runs) becomes the depthwise 1x1 conv that
  computes it, x * gamma / sqrt(var + eps) + (beta - mean * gamma / sqrt(var + eps)): ORT runs it as a
  QLinearConv, where ORT's own quantizer leaves the BatchNormalization float between Q/DQ. PTQ only
  (QAT trains BatchNorm statistics).
- A BatchNorm after a Linear (LeViT's Linear then BatchNorm1d over the flattened tokens), through permutes
  and reshapes that keep the channels last, folds into the Linear's weight rows and bias, as prepare folds a
  conv's: ORT then runs one QGemm where both its quantizer's model and the graph before this rule ran the
  BatchNormalization in float. PTQ only, as above.
- adaptive_avg_pool to size 1 becomes a mean over the spatial dims: the same values, exported
  as ReduceMean (quantcli.onnx.rewrite turns it into GlobalAveragePool) and never as the
  as_strided copy the pool's decomposition adds for channels-last inputs.
- A multiplication by a per-channel constant or a scalar right after a Linear/Conv (ConvNeXt's
  layer scale, a query scaling), through permutes and eval-mode dropout, is folded into that layer's
  weight and bias.
- A Linear/Conv weight (or bias) computed from parameters alone (weight standardization, as in NFNets'
  `ScaledStdConv2d` through `batch_norm(training=True)` without running statistics; weight norm's
  g * v / |v|) is computed once into a parameter of its own: the layer is then quantized per channel
  like any other, and no normalization without statistics is left for the switch to eval mode. PTQ only
  (in QAT those parameters train).
- addcmul(b, a, x) is written out as b + a * x, and a per-feature constant scale and shift right before a
  Linear (ResMLP's `Affine`) are folded into its weight and bias: W * a, b + W @ c.
- A Linear on an activation of rank 3 or more (tokens, or MambaOut's and ConvNeXt-style blocks' NHWC
  tensors) runs on its rows flattened to 2-D and reshaped back: it exports as MatMul then a float bias
  Add, which ORT runs as MatMulIntegerToFloat and a float Add (and a QuantizeLinear where the output is
  quantized: ORT's QDQ selectors want it right after the MatMul); on 2-D it exports as Gemm, which ORT runs
  as one QGemm with an int32 bias, its output uint8 or float as the consumer needs. In transformers the
  float Add of most Linears joined a kernel ORT fuses around it (SkipLayerNormalization, BiasGelu; those
  need 3-D inputs), but not that of q, k and v; on NHWC tensors none did (MambaOut: 39 float Adds).
- A bias read by several Linears (a module applied more than once) is read through a node of its own by
  each: its int32 form is quantized with that Linear's input scale, and ORT's QGemm reads it so (one
  observer for all gave a second call the first one's scale: 13.3 dB where the unfused graph had 25).
- baddbmm(b, x, y, beta, alpha) (BLOOM's attention scores with their ALiBi bias) is written out as
  beta * b + (alpha * x) @ y: the bmm is a matmul the quantizer annotates, where baddbmm had no kind and
  ORT ran it as a float FusedMatMul.
- A table indexed by constant positions, table[index] of a 2-D weight (Swin's and BEiT's relative-position
  bias, 169 rows gathered into 2401 for a 7x7 window), becomes embedding(table, index), the same rows: the
  table is then quantized as an embedding (int8 rows) and gathered at run time. Left as indexing, the
  exporter folded it into the gathered float table: 4 bytes for each of 14 times the values.
- A `type_as` to the dtype a tensor already has (EVA's rotary output `.type_as(v)`) is dropped: as an op
  of no kind it cut the float path the quantizer's selection follows, so nothing between the Linears
  before it and the attention matmul after it was quantized.
- A negation inside a rearrangement that a constant then multiplies (rotary embeddings' rot(x) * sin,
  rot(x) = stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape) or cat([-x2, x1], -1)) moves into that
  constant: the same values, and what is left is data movement ORT runs on uint8 and a QLinearMul (ORT
  has no integer Neg: it ran between a DequantizeLinear and a QuantizeLinear).

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
from quantcli.quantizers.patterns import KIND, value

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
_RESHAPES = (aten.reshape.default, aten.view.default)
_ROW_RESHAPES = (*_RESHAPES, aten._unsafe_view.default, aten.flatten.using_ints)  # any reshape's forms
# weight args[1], bias args[2]
_WEIGHTED = tuple(op for op, kind in KIND.items() if kind in ("conv", "conv_transpose", "linear"))


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


def fold_weight_computations(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """A Linear/Conv weight or bias computed from parameters and constants only -> a new parameter; how many.

    The parameters are `_quantcli_weight_<k>` in graph order (prepare in another process makes the same keys).
    """
    made: list[str] = []

    def rewrite(node: Node, done: int) -> bool:
        if node.op != "call_function" or node.target not in _WEIGHTED or not wanted(node):
            return False
        before = len(made)
        for index in (1, 2):
            computed = node.args[index] if len(node.args) > index else None
            if not (isinstance(computed, Node) and computed.op == "call_function" and _constant(computed)):
                continue
            with torch.no_grad():
                tensor = _evaluate(model, computed, {}).detach().clone().contiguous()
            made.append(name := f"_quantcli_weight_{len(made)}")
            model.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
            with model.graph.inserting_before(node):
                attr = model.graph.get_attr(name)
            attr.meta["val"] = model.get_parameter(name)
            node.replace_input_with(computed, attr)
        return len(made) > before

    rewrite_each(model, rewrite)
    return len(made)


def _constant(node: Node) -> bool:
    """Whether `node` reads only parameters, buffers and literals (no input, nothing random)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen or n.op == "get_attr":
            continue
        if n.op != "call_function" or getattr(n.target, "is_nondeterministic", False):
            return False
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return True


def _constant_value(model: GraphModule, node) -> torch.Tensor | None:
    """The tensor a node computes from parameters and constants alone (a reshaped layer scale), or None."""
    if not (isinstance(node, Node) and node.op in ("get_attr", "call_function") and _constant(node)):
        return None
    with torch.no_grad():
        result = _evaluate(model, node, {})
    return result if isinstance(result, torch.Tensor) else None


def _evaluate(model: GraphModule, node: Node, done: dict):
    """The value of a constant node (see _constant), its inputs computed first."""
    if node not in done:
        if node.op == "get_attr":
            done[node] = get_attr_value(model, node)
        else:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: _evaluate(model, n, done))
            done[node] = node.target(*args, **kwargs)
    return done[node]


def decompose_gates(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """silu(x) -> x * sigmoid(x), hardswish(x) -> x * hardsigmoid(x) (equal up to float rounding); how many."""

    def gated(node: Node) -> Node:
        x, gate = node.args[0], _GATED[node.target]
        sig = call_like(model.graph, node, gate, (x,), gate(value(x)))
        return call_like(model.graph, node, aten.mul.Tensor, (x, sig), node.meta["val"])

    return _write_out(model, lambda node: node.target in _GATED and wanted(node), gated)


def _write_out(model: GraphModule, chosen: Callable[[Node], bool], build: Callable[[Node], Node]) -> int:
    """Replace each call node `chosen` accepts by the nodes `build` inserts before it (the last one returned)."""

    def rewrite(node: Node, done: int) -> bool:
        if node.op != "call_function" or not chosen(node):
            return False
        with model.graph.inserting_before(node):
            new = build(node)
        replace(model.graph, node, new)
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
        if affine is None or value(node.args[0]).dim() not in _CONVS:
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
    if training or val is None or val.dim() < 2 or not isinstance(val.shape[1], int):
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


def fold_norms_into_linears(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """batch_norm(reshape*(linear(x))) in eval mode -> reshape*(linear'(x)), the norm's per-channel scale and
    shift folded into the weight rows and the bias (LeViT's Linear then BatchNorm1d over the flattened tokens);
    how many. The path from the Linear to the norm's channel axis: single-use permutes, and reshapes that keep
    the channels last (a row-major reshape with an equal last dimension moves no element to another channel).
    A Linear without a bias gets one, `_quantcli_linear_norm_<k>_bias` in graph order.
    """

    def rewrite(node: Node, done: int) -> bool:
        if node.op != "call_function" or node.target is not aten.batch_norm.default or not wanted(node):
            return False
        affine = _norm_as_affine(model, node)
        linear = _linear_behind(node.args[0], 1) if affine is not None else None
        if linear is None or not wanted(linear) or not _foldable_weights(model, linear):
            return False
        scale, shift = affine
        weight = linear.args[1]
        set_parameter(model, weight.target, get_attr_value(model, weight).detach() * scale[:, None])
        bias = linear.args[2] if len(linear.args) > 2 else None
        if isinstance(bias, Node):
            set_parameter(model, bias.target, get_attr_value(model, bias).detach() * scale + shift)
        else:
            name = f"_quantcli_linear_norm_{done}_bias"
            model.register_parameter(name, torch.nn.Parameter(shift, False))
            with model.graph.inserting_before(linear):
                bias = model.graph.get_attr(name)
            bias.meta["val"] = model.get_parameter(name)
            linear.args = (linear.args[0], weight, bias)
        replace(model.graph, node, node.args[0])
        return True

    return rewrite_each(model, rewrite)


def _linear_behind(y: Node, axis: int) -> Node | None:
    """The Linear whose output channels are `y`'s `axis`, through single-use permutes and reshapes keeping the
    channels last (each node on the way, y included, read by the next alone but for its shape), else None."""
    node = y
    while isinstance(node, Node) and node.op == "call_function" and value(node) is not None:
        if len([u for u in node.users if not _reads_shape(u, node)]) != 1:
            return None
        out = value(node)
        if node.target is aten.linear.default:
            return node if axis == out.dim() - 1 else None
        if node.target is aten.permute.default:
            axis = [d % out.dim() for d in node.args[1]][axis]
        elif node.target is aten.transpose.int:
            a, b = (d % out.dim() for d in node.args[1:3])
            axis = b if axis == a else a if axis == b else axis
        elif node.target in _ROW_RESHAPES:
            before = value(node.args[0])
            if before is None or axis != out.dim() - 1 or before.shape[-1] != out.shape[-1]:
                return None
            axis = before.dim() - 1
        elif not _identity(node):
            return None
        node = node.args[0]
    return None


def _reads_shape(user: Node, of: Node) -> bool:
    """`user` reads only the shape of `of` (LeViT's `bn(x.flatten(0, 1)).reshape_as(x)`), which a fold keeps."""
    if user.target is aten.sym_size.int:
        return True
    return user.target in (aten.reshape_as.default, aten.view_as.default) and user.args[0] is not of


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
        constant = _constant_value(model, c)
        if not isinstance(y, Node) or (constant is None and not isinstance(c, numbers.Real)) or isinstance(c, bool):
            continue
        layer, axis = _producer(y)
        if layer is None:
            continue
        scales = _channel_vector(constant if constant is not None else float(c), value(y), axis)
        if scales is not None and _foldable_weights(model, layer):
            return layer, scales, y
    return None


def decompose_addcmul(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """addcmul(b, a, x) -> b + a * x (ResMLP's Affine, a response norm's scale and shift); how many.

    The Mul and the Add are then what the folds into a neighbouring layer and the quantizer's selection see.
    """

    def written_out(node: Node) -> Node:
        b, a, x = node.args
        mul = call_like(model.graph, node, aten.mul.Tensor, (x, a), aten.mul.Tensor(value(x), value(a)))
        return call_like(model.graph, node, aten.add.Tensor, (mul, b), node.meta["val"])

    def chosen(node: Node) -> bool:
        plain = node.kwargs.get("value", 1) == 1 and len(node.args) == 3
        return node.target is aten.addcmul.default and plain and wanted(node)

    return _write_out(model, chosen, written_out)


def fold_input_affines(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """linear(x * a + c) -> linear'(x) with W' = W * a (per input feature) and b' = b + W @ c; how many.

    `a` and `c` constants varying only along the last axis (ResMLP's Affine before its channel MLP); the
    Mul and Add read by nothing else. A bias the layer lacks becomes `_quantcli_bias_<k>` (graph order).
    """

    def rewrite(node: Node, done: int) -> bool:
        if node.op != "call_function" or node.target is not aten.linear.default or not wanted(node):
            return False
        found = _input_affine(model, node)
        if found is None or not _foldable_weights(model, node):
            return False
        x, scale, shift = found
        weight = node.args[1]
        w = get_attr_value(model, weight).detach()
        bias = node.args[2] if len(node.args) > 2 else None
        b = get_attr_value(model, bias).detach() if isinstance(bias, Node) else torch.zeros(w.shape[0], dtype=w.dtype)
        set_parameter(model, weight.target, w * scale)
        new_bias = b + w @ shift
        if isinstance(bias, Node):
            set_parameter(model, bias.target, new_bias)
        else:
            name = f"_quantcli_bias_{done}"
            trains = get_attr_value(model, weight).requires_grad  # QAT: trained as the weight is
            model.register_parameter(name, torch.nn.Parameter(new_bias, requires_grad=trains))
            with model.graph.inserting_before(node):
                bias = model.graph.get_attr(name)
            bias.meta["val"] = model.get_parameter(name)
        node.args = (x, weight, bias)
        return True

    return rewrite_each(model, rewrite)


def separate_shared_biases(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """Give each Linear after the first that reads a shared bias node a get_attr of its own; how many."""

    def rewrite(node: Node, done: int) -> bool:
        if node.op != "call_function" or node.target is not aten.linear.default or not wanted(node):
            return False
        bias = node.args[2] if len(node.args) > 2 else None
        if not (isinstance(bias, Node) and bias.op == "get_attr" and next(iter(bias.users)) is not node):
            return False
        with model.graph.inserting_before(node):
            own = model.graph.get_attr(bias.target)
        own.meta.update(bias.meta)
        node.replace_input_with(bias, own)
        return True

    return rewrite_each(model, rewrite)


def flatten_linears(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """linear(x) on x of shape (B, d1, ..., K), rank >= 3, d1... static -> reshape(linear(x.reshape(-1, K)), x's
    leading dims + (N,)); how many. The weight and bias stay the same nodes (no new state_dict keys)."""

    def rewrite(node: Node, done: int) -> bool:
        if node.op != "call_function" or node.target is not aten.linear.default or not wanted(node):
            return False
        x, out = value(node.args[0]), value(node)
        if x is None or out is None or x.dim() < 3 or not all(isinstance(d, int) for d in x.shape[1:]):
            return False
        rows = [-1, x.shape[-1]]
        graph = model.graph
        with graph.inserting_before(node):
            flat = call_like(graph, node, aten.reshape.default, (node.args[0], rows), x.reshape(rows))
        with graph.inserting_after(node):
            back = call_like(graph, node, aten.reshape.default, (node, [-1, *out.shape[1:]]), out)
        # the linear node itself reads the rows, so it keeps its name: the ONNX values and the report's taps
        # are named after it (quantcli.report.ort_taps)
        node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
        node.args = (flat, *node.args[1:])
        node.meta["val"] = out.reshape(-1, out.shape[-1])
        return True

    return rewrite_each(model, rewrite)


def drop_identity_casts(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """type_as of a float tensor to its own dtype -> the tensor; how many.

    Not `to`: Hugging Face's RMS norms (T5, Llama) compute in float32 through `.to(torch.float32)`, and
    with those casts gone the selection quantized Muls inside the norm, which ORT then no longer fused.
    """

    def rewrite(node: Node, done: int) -> bool:
        if node.op != "call_function" or node.target is not aten.type_as.default or not wanted(node):
            return False
        x, out = node.args[0], value(node)
        before = value(x)
        if before is None or out is None or before.dtype != out.dtype or not out.dtype.is_floating_point:
            return False
        if set(node.kwargs) - {"dtype"} or before.device != out.device or before.shape != out.shape:
            return False
        replace(model.graph, node, x)
        return True

    return rewrite_each(model, rewrite)


def decompose_baddbmm(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """baddbmm(b, x, y, beta=beta, alpha=alpha) -> beta * b + (alpha * x) @ y (BLOOM's ALiBi scores); how many.

    The bmm is then a matmul the quantizer annotates; a positive alpha on its left operand is a change of that
    operand's quantization scale (as the written-out attention's query scaling), which the export removes.
    """

    def scaled(node: Node, x: Node, factor) -> Node:
        if factor == 1:
            return x
        return call_like(model.graph, node, aten.mul.Tensor, (x, factor), aten.mul.Tensor(value(x), factor))

    def written_out(node: Node) -> Node:
        b, x, y = node.args
        x = scaled(node, x, node.kwargs.get("alpha", 1))
        product = call_like(model.graph, node, aten.bmm.default, (x, y), aten.bmm.default(value(x), value(y)))
        b = scaled(node, b, node.kwargs.get("beta", 1))
        return call_like(model.graph, node, aten.add.Tensor, (product, b), node.meta["val"])

    def chosen(node: Node) -> bool:
        if node.target is not aten.baddbmm.default or len(node.args) != 3 or not wanted(node):
            return False
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        numbers_only = all(isinstance(v, numbers.Real) for v in (beta, alpha))
        return numbers_only and beta != 0 and alpha > 0  # beta 0 ignores b, NaN included: left as it is

    return _write_out(model, chosen, written_out)


def index_as_embedding(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """table[index], a 2-D weight indexed on its rows by a constant of non-negative integers -> embedding(table,
    index); how many."""

    def rewrite(node: Node, done: int) -> bool:
        if node.op != "call_function" or node.target is not aten.index.Tensor or not wanted(node):
            return False
        table, indices = node.args[0], node.args[1]
        if len(indices) != 1 or not isinstance(indices[0], Node) or not _constant(table):
            return False
        rows, index = _constant_value(model, table), _constant_value(model, indices[0])
        if rows is None or rows.dim() != 2 or not rows.dtype.is_floating_point or index is None:
            return False
        if index.dtype not in (torch.int32, torch.int64) or index.numel() == 0 or int(index.min()) < 0:
            return False  # embedding takes no negative index, where indexing counts from the end
        with model.graph.inserting_before(node):
            embedding = call_like(model.graph, node, aten.embedding.default, (table, indices[0]), value(node))
        replace(model.graph, node, embedding)
        return True

    return rewrite_each(model, rewrite)


def fold_negations(model: GraphModule, wanted: Callable[[Node], bool]) -> int:
    """mul(y, c), y = [reshape](cat/stack([..., -a, ...], -1)) and c constant -> the negations dropped and c
    times their signs along the last axis, a parameter `_quantcli_signed_<k>` (graph order); how many."""

    def rewrite(node: Node, done: int) -> bool:
        if node.op != "call_function" or node.target is not aten.mul.Tensor or not wanted(node):
            return False
        for y, c in (node.args[:2], node.args[1::-1]):
            constant = _constant_value(model, c)
            found = _negated_join(y) if isinstance(y, Node) and constant is not None else None
            if found is None or constant.dim() == 0 or constant.shape[-1] not in (1, len(found[1])):
                continue
            join, signs = found
            name = f"_quantcli_signed_{done}"
            model.register_parameter(name, torch.nn.Parameter(constant * signs.to(constant.dtype), False))
            with model.graph.inserting_before(node):
                attr = model.graph.get_attr(name)
            attr.meta["val"] = model.get_parameter(name)
            node.replace_input_with(c, attr)
            join.args = ([a.args[0] if _negation(a) else a for a in join.args[0]], *join.args[1:])
            return True
        return False

    return rewrite_each(model, rewrite)


_JOINS = (aten.cat.default, aten.concat.default, aten.stack.default)


def _negation(node) -> bool:
    return isinstance(node, Node) and node.target is aten.neg.default and len(node.users) == 1


def _negated_join(y: Node) -> tuple[Node, torch.Tensor] | None:
    """(the cat/stack behind y, y's sign along its last axis) when y, read only by one mul, joins negated parts
    along its last axis (a stack's new last axis merged into the one before by a reshape), else None."""
    join = y.args[0] if y.target in _RESHAPES and isinstance(y.args[0], Node) else y
    if join.target not in _JOINS or len(y.users) != 1 or (join is not y and len(join.users) != 1):
        return None
    parts, out, joined = join.args[0], value(y), value(join)
    dim = join.args[1] if len(join.args) > 1 else 0
    if out is None or joined is None or dim % joined.dim() != joined.dim() - 1 or not any(map(_negation, parts)):
        return None
    sign = [-1.0 if _negation(p) else 1.0 for p in parts]
    if join.target is aten.stack.default:
        pairs = joined.shape[-2]
        merged = join is not y and out.dim() == joined.dim() - 1 and out.shape[-1] == pairs * len(parts)
        if join is not y and not merged:
            return None
        return join, torch.tensor(sign * pairs if merged else sign)  # position i * len(parts) + j: part j
    if join is not y:
        return None
    widths = [value(p).shape[-1] for p in parts]
    return join, torch.cat([torch.full((w,), s) for w, s in zip(widths, sign)])


def _input_affine(model: GraphModule, linear: Node):
    """(x, scale, shift) when the linear's input is x * a + c, x * a or x + c with foldable constants, else None."""
    features = value(linear.args[1]).shape[1]
    scale = torch.ones(features, dtype=value(linear.args[1]).dtype)
    shift = torch.zeros_like(scale)
    z, folded = linear.args[0], False
    for target in (aten.add.Tensor, aten.mul.Tensor):  # the add is outermost
        if not (isinstance(z, Node) and z.target is target and len(z.users) == 1 and not z.kwargs):
            continue
        for x, c in (z.args[:2], z.args[1::-1]):
            constant = _constant_value(model, c)
            y = value(x)
            vector = None if constant is None or y is None else _channel_vector(constant, y, y.dim() - 1)
            if vector is not None and isinstance(x, Node):
                if target is aten.add.Tensor:
                    shift = vector
                else:
                    scale = vector
                z, folded = x, True
                break
    return (z, scale, shift) if folded else None


def _producer(y: Node) -> tuple[Node | None, int]:
    """The single-use Linear/Conv behind `y` (through single-use permutes) and the axis of y holding its channels."""
    chain = []
    node = y
    while node.op == "call_function" and (node.target in _PERMUTES or _identity(node)) and len(node.users) == 1:
        if node.target in _PERMUTES:
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


def _identity(node: Node) -> bool:
    """An op that passes its input through unchanged: dropout in eval mode (or p = 0), a copy."""
    if node.target in (aten.dropout.default, aten.dropout_.default):
        return node.args[2] is False or node.args[1] == 0
    return node.target in (aten.clone.default, aten.contiguous.default, aten.alias.default)


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
