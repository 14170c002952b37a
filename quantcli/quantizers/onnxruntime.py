"""quantcli's own PT2E quantizer: annotates what ONNX Runtime runs as integer kernels.

Activations uint8 asymmetric and weights int8 symmetric per output channel by default, the
combination ORT's QDQ fusions need. Conv(+BN)(+ReLU/ReLU6) and Linear/MatMul quantize their
inputs and weights (scaled_dot_product_attention is written out first, so its two matmuls are
among them); a conv chain also quantizes its output, so DQ-Conv-Q becomes QLinearConv.
Add/Mul, ReLU, pooling, concat and shape ops are quantized only where a quantized consumer
follows, so no Q/DQ pair lands in front of an op that stays float (LayerNorm, Softmax, GELU,
Hardswish...). Only floating-point tensors are touched: ids, masks, positions and shapes stay
as captured. Annotation is a pure function of the graph and the QuantizationSection.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    Quantizer,
    SharedQuantizationSpec,
)

from quantcli.quantizers.attention import decompose_sdpa
from quantcli.quantizers.equalize import equalize_ffn
from quantcli.quantizers.policy import Policy, check_matches
from quantcli.quantizers.specs import Setting, activation_spec, bias_spec, weight_spec
from quantcli.recipe import QuantizationSection

aten = torch.ops.aten
KEY = "quantization_annotation"

_OPS = {
    "conv": (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
             aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding),
    "conv_transpose": (aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                       aten.conv_transpose3d.input),
    "linear": (aten.linear.default,),
    "matmul": (aten.matmul.default, aten.bmm.default, aten.mm.default),
    "binary": (aten.add.Tensor, aten.add_.Tensor, aten.mul.Tensor, aten.mul_.Tensor),
    "relu": (aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default),
    "cat": (aten.cat.default, aten.concat.default),
    # the output keeps the input's quantization parameters; ORT keeps these integer
    "shared": (aten.max_pool1d.default, aten.max_pool2d.default, aten.avg_pool1d.default,
               aten.avg_pool2d.default, aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
               aten.reshape.default, aten.view.default, aten.flatten.using_ints, aten.permute.default,
               aten.transpose.int, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
               aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.dropout.default,
               aten.clone.default, aten.slice.Tensor, aten.select.int),
}
KIND = {op: kind for kind, ops in _OPS.items() for op in ops}
BATCH_NORM = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
              aten._native_batch_norm_legit.default}
WEIGHTED = ("conv", "conv_transpose", "linear", "matmul")


def is_float(arg) -> bool:
    val = arg.meta.get("val") if isinstance(arg, Node) else None
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def is_activation(arg) -> bool:
    return is_float(arg) and arg.op != "get_attr"


def is_annotated(node: Node) -> bool:
    return KEY in node.meta and node.meta[KEY]._annotated


def annotate(node: Node, inputs: dict, output=None) -> None:
    node.meta[KEY] = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=output, _annotated=True)


def only_user(node: Node) -> Optional[Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def quantizable(node: Node) -> bool:
    """Whether the op and its inputs are of a kind this quantizer handles (float tensors only)."""
    kind = KIND.get(node.target)
    if kind is None or not is_float(node):
        return False
    if kind in WEIGHTED:
        x, w = node.args[0], node.args[1]
        return is_activation(x) and is_float(w) and (kind == "matmul" or w.op == "get_attr")
    if kind == "binary":  # two activations; a constant operand (a scale, a bias) stays float
        return all(isinstance(a, Node) and is_activation(a) for a in node.args[:2])
    if kind == "cat":
        return all(is_activation(a) for a in node.args[0])
    return is_activation(node.args[0])


class OnnxRuntimeQuantizer(Quantizer):
    """Annotates Conv/Linear/MatMul chains, Add/Mul, pooling and shape ops for ORT's QDQ fusion."""

    def __init__(self, q: QuantizationSection, *, qat: bool = False):
        super().__init__()
        self.q = q
        self.qat = qat

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        """Write SDPA out as matmuls (so both get quantized) and equalize FFNs, where quantized."""
        check_matches(self.q, model.graph)
        policy = Policy(self.q, qat=self.qat)
        decompose_sdpa(model, lambda sdpa: policy.setting(sdpa) is not None)
        if self.q.equalize:
            equalize_ffn(model, lambda fc2: policy.setting(fc2) is not None)
        return model

    def annotate(self, model: GraphModule) -> GraphModule:
        policy = Policy(self.q, qat=self.qat)
        wants = self._takes_int8(model.graph, policy)
        for node in model.graph.nodes:
            if node.op != "call_function" or is_annotated(node) or not wants.get(node, False):
                continue
            kind = KIND[node.target]
            setting = policy.setting(node)
            out = any(wants.get(u, False) for u in node.users)
            getattr(self, f"_annotate_{kind}")(node, setting, out, policy)
        return model

    def validate(self, model: GraphModule) -> None:
        return None

    @staticmethod
    def _takes_int8(graph, policy: Policy) -> dict[Node, bool]:
        """Node -> whether it will be quantized (and so quantizes its float activation inputs).

        Conv/Linear/MatMul always are; the other kinds only where one of their users is, which
        is known for every user first because the graph is walked backwards.
        """
        wants: dict[Node, bool] = {}
        for node in reversed(graph.nodes):
            if node.op != "call_function" or not quantizable(node) or policy.setting(node) is None:
                continue
            wants[node] = KIND[node.target] in WEIGHTED or any(wants.get(u, False) for u in node.users)
        return wants

    # -- one method per kind: (node, setting, whether a quantized consumer follows, policy)
    def _annotate_conv(self, conv: Node, s: Setting, out: bool, policy: Policy) -> None:
        """conv [-> batch_norm (QAT; prepare folds it first in PTQ)] [-> relu/hardtanh], output quantized."""
        self._conv_chain(conv, s, weight_spec(s, 0))

    def _annotate_conv_transpose(self, conv: Node, s: Setting, out: bool, policy: Policy) -> None:
        groups = conv.args[6] if len(conv.args) > 6 else 1
        per_channel = s.w_per_channel and groups == 1  # weight is (in, out/groups, ...): axis 1
        self._conv_chain(conv, s, weight_spec(dataclasses.replace(s, w_per_channel=per_channel), 1))

    def _conv_chain(self, conv: Node, s: Setting, w_spec) -> None:
        act = activation_spec(s)
        annotate(conv, {conv.args[0]: act, conv.args[1]: w_spec})
        last = conv
        nxt = only_user(last)
        if nxt is not None and nxt.target in BATCH_NORM:
            last, nxt = self._absorb(nxt)
            if nxt is not None and nxt.target is operator.getitem:
                last, nxt = self._absorb(nxt)
        if nxt is not None and KIND.get(nxt.target) == "relu" and not is_annotated(nxt):
            last, _ = self._absorb(nxt)
        last.meta[KEY].output_qspec = act

    @staticmethod
    def _absorb(node: Node) -> tuple[Node, Optional[Node]]:
        """Make `node` part of the pattern before it; return it and its only user."""
        if not is_annotated(node):
            annotate(node, {})
        return node, only_user(node)

    def _annotate_linear(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        act = activation_spec(s)
        x, w = node.args[0], node.args[1]
        inputs = {x: act, w: weight_spec(s, 0)}
        bias = node.args[2] if len(node.args) > 2 else None
        # A 2-D linear exports as Gemm, which ORT fuses (QGemm) only with an int32 bias.
        if isinstance(bias, Node) and bias.op == "get_attr" and x.meta["val"].dim() == 2:
            inputs[bias] = bias_spec(s, (x, node), (w, node))
        annotate(node, inputs, act if out else None)

    def _annotate_matmul(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        act = activation_spec(s)
        a, b = node.args[0], node.args[1]
        b_spec = weight_spec(s, b.meta["val"].dim() - 1) if b.op == "get_attr" else act
        annotate(node, {a: act, b: b_spec}, act if out else None)

    def _annotate_binary(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        """Add/Mul of two activations, with a following ReLU folded in (QLinearAdd/QLinearMul)."""
        act = activation_spec(s)
        annotate(node, {a: act for a in node.args[:2]})
        last = node
        nxt = only_user(node)
        if nxt is not None and KIND.get(nxt.target) == "relu" and policy.setting(nxt) is not None:
            last, _ = self._absorb(nxt)
        last.meta[KEY].output_qspec = act

    def _annotate_relu(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        act = activation_spec(s)
        annotate(node, {node.args[0]: act}, act)

    def _annotate_cat(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        """Own ranges per input: QLinearConcat requantizes, and a producer's ReLU stays foldable."""
        act = activation_spec(s)
        annotate(node, {a: act for a in node.args[0]}, act)

    def _annotate_shared(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        x = node.args[0]
        annotate(node, {x: activation_spec(s)}, SharedQuantizationSpec((x, node)))
