"""quantcli's own PT2E quantizer: annotates what ONNX Runtime runs as integer kernels.

Activations uint8 asymmetric and weights int8 symmetric per output channel by default, the
combination ORT's QDQ fusions need. Conv(+BN)(+ReLU/ReLU6), Linear, addmm and MatMul quantize
their inputs and weights (scaled_dot_product_attention is written out first, so its two matmuls
are among them); a conv chain also quantizes its output, so DQ-Conv-Q becomes QLinearConv, and a
zero pad right before a conv is left between its DequantizeLinear and the conv, where ORT folds
it into the QLinearConv. Add/Mul, ReLU, sigmoid (SiLU and Hardswish are written out as x * sigmoid(x)
and x * hardsigmoid(x)), pooling, global means, concat, split and shape ops are quantized where a
quantized consumer follows or where they would otherwise be a float island (quantizers.selection),
never in front of an op that stays float only because of them (LayerNorm, Softmax, GELU...). Only
floating-point tensors are touched: ids, masks, positions and shapes stay as captured.
Annotation is a pure function of the graph and the QuantizationSection.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    Quantizer,
    SharedQuantizationSpec,
)

import quantcli.quantizers.rewrites as rewrites
from quantcli.quantizers.attention import decompose_sdpa
from quantcli.quantizers.equalize import equalize_ffn
from quantcli.quantizers.observers import ACTIVATION_OBSERVERS, ChosenRangeObserver, HistogramObserver
from quantcli.quantizers.patterns import (
    BATCH_NORM,
    KIND,
    UNIT_RANGE,
    absorbed_pad,
    is_activation,
    nonnegative,
    only_user,
    positive_scalar,
    value,
)
from quantcli.quantizers.policy import Policy, check_matches
from quantcli.quantizers.regions import inline_regions
from quantcli.quantizers.selection import quantized_nodes
from quantcli.quantizers.specs import (
    Setting,
    activation_spec,
    bias_spec,
    embedding_spec,
    scaled_spec,
    unit_range_spec,
    weight_spec,
)
from quantcli.recipe import QuantizationSection

KEY = "quantization_annotation"


def _input_spec(s: Setting, x: Node):
    """An activation's spec: [0, 1] fixed where the op producing it bounds it so (a hardsigmoid gate)."""
    return unit_range_spec(s) if x.op == "call_function" and x.target in UNIT_RANGE else activation_spec(s)


def is_annotated(node: Node) -> bool:
    return KEY in node.meta and node.meta[KEY]._annotated


def annotate(node: Node, inputs: dict, output=None) -> None:
    node.meta[KEY] = QuantizationAnnotation(input_qspec_map=inputs, output_qspec=output, _annotated=True)


class OnnxRuntimeQuantizer(Quantizer):
    """Annotates conv/linear/matmul chains and the ops around them for ORT's QDQ fusions."""

    def __init__(self, q: QuantizationSection, *, qat: bool = False):
        super().__init__()
        self.q = q
        self.qat = qat

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        """Rewrites that give ORT integer forms (see quantizers.rewrites), where the policy quantizes."""
        inline_regions(model, grad_modes=not self.qat)  # their ops annotated like any other
        check_matches(self.q, model.graph)
        policy = Policy(self.q, qat=self.qat)
        wanted = lambda node: policy.setting(node) is not None  # noqa: E731
        if not self.qat:  # weights computed from parameters: constants first, for every rule below
            rewrites.fold_weight_computations(model, wanted)
        rewrites.drop_identity_casts(model, wanted)
        rewrites.index_as_embedding(model, wanted)
        decompose_sdpa(model, wanted)
        rewrites.decompose_addcmul(model, wanted)
        rewrites.decompose_baddbmm(model, wanted)
        rewrites.fold_input_affines(model, wanted)  # before equalization, whose Mul before a Linear must stay
        if self.q.equalize:
            equalize_ffn(model, wanted)
        if not self.qat:
            rewrites.fold_norms_into_linears(model, wanted)  # before flatten_linears, which reshapes their rows
            rewrites.norms_to_convs(model, wanted)
        rewrites.decompose_gates(model, wanted)
        rewrites.pools_to_means(model, wanted)
        rewrites.fold_channel_scales(model, wanted)
        rewrites.fold_negations(model, wanted)
        rewrites.separate_shared_biases(model, wanted)
        rewrites.flatten_linears(model, wanted)  # last: the folds above look for the linear behind a permute
        return model

    def annotate(self, model: GraphModule) -> GraphModule:
        policy = Policy(self.q, qat=self.qat)
        chosen = quantized_nodes(model.graph, policy)
        for node in model.graph.nodes:
            if node not in chosen or is_annotated(node):
                continue
            out = any(u in chosen for u in node.users)
            self.ANNOTATORS[KIND[node.target]](self, node, policy.setting(node), out, policy)
        return model

    def validate(self, model: GraphModule) -> None:
        return None

    # -- one method per kind: (node, setting, whether a quantized consumer follows, policy)
    def _annotate_conv(self, conv: Node, s: Setting, out: bool, policy: Policy) -> None:
        """conv [-> batch_norm (QAT; prepare folds it first in PTQ)] [-> relu/hardtanh], output quantized.

        A depthwise conv (one input and one output channel per group) runs in MLAS's depthwise kernels,
        which never add pairs of products in int16; every other conv runs in its u8 x s8 GEMM/ConvSym.
        """
        w = value(conv.args[1])
        groups = conv.args[6] if len(conv.args) > 6 else 1
        depthwise = w.shape[1] == 1 and w.shape[0] == groups
        self._conv_chain(conv, s, weight_spec(s, 0, None if depthwise else "conv"))

    def _annotate_conv_transpose(self, conv: Node, s: Setting, out: bool, policy: Policy) -> None:
        groups = conv.args[6] if len(conv.args) > 6 else 1
        per_channel = s.w_per_channel and groups == 1  # weight is (in, out/groups, ...): axis 1
        self._conv_chain(conv, s, weight_spec(dataclasses.replace(s, w_per_channel=per_channel), 1))

    def _conv_chain(self, conv: Node, s: Setting, w_spec) -> None:
        act = activation_spec(s)
        pad = absorbed_pad(conv)
        if pad is not None:  # DQ -> Pad -> Conv: quantize the pad's input, nothing between pad and conv
            annotate(pad, {pad.args[0]: act})
        annotate(conv, {conv.args[1]: w_spec} if pad is not None else {conv.args[0]: act, conv.args[1]: w_spec})
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
    def _absorb(node: Node) -> tuple[Node, Node | None]:
        """Make `node` part of the pattern before it; return it and its only user."""
        if not is_annotated(node):
            annotate(node, {})
        return node, only_user(node)

    def _annotate_linear(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        act = activation_spec(s)
        x, w = node.args[0], node.args[1]
        inputs = {x: act, w: weight_spec(s, 0, "matrix")}
        bias = node.args[2] if len(node.args) > 2 else None
        # A 2-D linear exports as Gemm, which ORT fuses (QGemm) only with an int32 bias.
        if isinstance(bias, Node) and bias.op == "get_attr" and value(x).dim() == 2:
            inputs[bias] = bias_spec(s, (x, node), (w, node))
        annotate(node, inputs, act if out else None)

    def _annotate_addmm(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        """bias + x @ W, W stored (in, out) as in GPT-2's Conv1D: per-channel on axis 1, int32 bias (QGemm)."""
        act = activation_spec(s)
        bias, x, w = node.args[:3]
        annotate(
            node,
            {x: act, w: weight_spec(s, 1, "matrix"), bias: bias_spec(s, (x, node), (w, node))},
            act if out else None,
        )

    def _annotate_matmul(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        act = activation_spec(s)
        a, b = node.args[0], node.args[1]
        b_spec = act if is_activation(b) else weight_spec(s, value(b).dim() - 1, "matrix")
        annotate(node, {a: act, b: b_spec}, act if out else None)

    def _annotate_embedding(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        """The table's rows int8 (see specs.embedding_spec); the gathered rows stay float, as the table was.

        A table a Linear reads too (GPT-2's tied LM head) takes that Linear's weight spec: one tensor gets
        one observer, and its rows are the Linear's output channels, so it stays per row (and pair-safe).
        """
        table = node.args[0]
        tied = any(u is not node and KIND.get(u.target) == "linear" and u.args[1] is table for u in table.users)
        annotate(node, {table: weight_spec(s, 0, "matrix") if tied else embedding_spec(s)})

    def _annotate_binary(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        """Add/Mul of two activations, a following ReLU folded in (QLinearAdd/QLinearMul).

        x * c with a positive scalar c (a query scaling) keeps x's quantization with its scale times
        c: on the integers that is no op at all, and the export removes it.
        """
        factor = positive_scalar(node)
        if factor is not None:
            x = node.args[0]
            annotate(node, {x: activation_spec(s)}, scaled_spec(s, (x, node), factor))
            return
        annotate(node, {a: _input_spec(s, a) for a in node.args[:2] if is_activation(a)})
        last = node
        nxt = only_user(node)
        if nxt is not None and KIND.get(nxt.target) == "relu" and policy.setting(nxt) is not None:
            last, _ = self._absorb(nxt)
        last.meta[KEY].output_qspec = activation_spec(s)

    def _annotate_relu(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        act = activation_spec(s)
        annotate(node, {node.args[0]: act}, act)

    def _annotate_cat(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        """One range for the concat and its inputs where it is the only reader of ReLU-like inputs.

        QLinearConcat copies an input whose parameters are the output's and requantizes any other one
        element by element. Inputs only the concat reads lose nothing by taking its range (their values
        reach nothing else), and ReLU-like ones keep a zero point of 0 in it, so the ReLU still folds
        into the conv before it. Any other input keeps its own range.
        """
        act = activation_spec(s)
        inputs = [a for a in node.args[0] if isinstance(a, Node)]
        if len(inputs) > 1 and all(len(a.users) == 1 and nonnegative(a) for a in inputs):
            first = (inputs[0], node)
            shared = SharedQuantizationSpec(first)
            annotate(node, {a: act if a is inputs[0] else shared for a in inputs}, shared)
            return
        annotate(node, {a: act for a in inputs}, act)

    def _annotate_requantizing(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        """Sigmoid, leaky ReLU: ORT's QLinear kernels give the output its own range."""
        act = activation_spec(s)
        annotate(node, {node.args[0]: act}, act)

    def _annotate_pool(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        """Average pools and global means: the output its own range, as ORT's quantizer gives it.

        QLinearAveragePool and QLinearGlobalAveragePool requantize at no cost, and a mean spans a fraction
        of its input's range. Under the range search (`histogram`, and `auto`, which may keep it) that range is
        the observed one: the search trades a tensor's rare outliers for resolution, and a mean of many values
        has none to trade; what it clipped were the largest features the head reads (sweep: 0 to +0.69 dB on 8
        nets, none lower).
        """
        searched = ACTIVATION_OBSERVERS[s.observer] in (HistogramObserver, ChosenRangeObserver)  # histogram, mse, auto
        out_setting = dataclasses.replace(s, observer="minmax") if searched else s
        annotate(node, {node.args[0]: activation_spec(s)}, activation_spec(out_setting))

    def _annotate_split(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        """Split/chunk/unbind: every piece keeps the input's parameters (ORT splits the uint8 tensor)."""
        x = node.args[0]
        annotate(node, {x: activation_spec(s)})
        for piece in node.users:
            if piece.target is operator.getitem and not is_annotated(piece):
                annotate(piece, {}, SharedQuantizationSpec((x, node)))

    def _annotate_getitem(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        self._annotate_split(node.args[0], s, out, policy)

    def _annotate_shared(self, node: Node, s: Setting, out: bool, policy: Policy) -> None:
        user = only_user(node)
        if user is not None and KIND.get(user.target) == "conv" and absorbed_pad(user) is node:
            return  # annotated with its conv
        x = node.args[0]
        annotate(node, {x: activation_spec(s)}, SharedQuantizationSpec((x, node)))

    ANNOTATORS: dict[str, Callable] = {
        "conv": _annotate_conv,
        "conv_transpose": _annotate_conv_transpose,
        "linear": _annotate_linear,
        "addmm": _annotate_addmm,
        "matmul": _annotate_matmul,
        "embedding": _annotate_embedding,
        "binary": _annotate_binary,
        "relu": _annotate_relu,
        "cat": _annotate_cat,
        "pool": _annotate_pool,
        "unary": _annotate_requantizing,
        "split": _annotate_split,
        "getitem": _annotate_getitem,
        "shared": _annotate_shared,
    }
