"""No avoidable float islands: each pattern the onnxruntime target gives an integer form, on tiny modules.

Every test quantizes in-process (capture, prepare, calibrate, convert, re-export), exports with
quantcli's own ONNX flow (rewrites, node origins, shape inference) and reads ORT's optimized graph
through quantcli.onnx.fusion.analyze, for tests/tolerances.py's target (avx2: pair-safe weights, the
same integers on every x86 machine, so the SQNR floors hold on AVX2 and VNNI alike). The ONNX
rewrites are also checked alone, on hand-built graphs, for equal outputs in ORT.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantcli import _torch, quantizers
from quantcli.numerics.parity import sqnr_db
from quantcli.onnx import export as onnx_export
from quantcli.onnx import rewrite, runtime
from quantcli.onnx.fusion import analyze
from quantcli.onnx.graph import Graph
from quantcli.recipe import QuantizationSection
from tests.tolerances import QUANTIZATION

torch = _torch.torch
nn, F = torch.nn, torch.nn.functional


@dataclass
class Result:
    fp: np.ndarray
    int8: np.ndarray
    ort: np.ndarray
    analysis: dict
    path: Path
    converted: object

    def optimized_ops(self) -> Counter:
        from quantcli.onnx.fusion import optimized_graph

        return Counter(n.op_type for n in optimized_graph(self.path).node)

    def defects(self) -> list:
        return [i for i in self.analysis["islands"] if not i["allowed"]]


def quantize(model: nn.Module, shape: tuple, folder: Path, qat: bool = False, **q) -> Result:
    """The pipeline's steps in-process, exported as `quantcli export` does (without the parity report)."""
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, *shape[1:], generator=g) for _ in range(4)]
    test = torch.randn(16, *shape[1:], generator=g)
    dynamic = ({0: torch.export.Dim("batch")},)
    section = quantizers.resolve(QuantizationSection(**{**QUANTIZATION, **q}))  # the floors' target (tolerances)
    prepared = _torch.prepare(
        _torch.export_program(model, (calib[0],), dynamic).module(), quantizers.build(section, qat=qat), qat
    )
    if qat:
        _torch.to_eval(prepared)
    with torch.no_grad():
        for x in calib:
            prepared(x)
    converted = _torch.convert(prepared, fold_quantize=True)
    _torch.prune_unused(converted)
    program = _torch.export_program(converted, (calib[0],), dynamic)
    proto = onnx_export.to_onnx(program, opset=18, input_names=["x"], output_names=["y"])
    onnx_export.tidy(proto)
    onnx_export.check(proto)
    proto = onnx_export.infer_shapes(proto)
    shapes = onnx_export.shape_coverage(proto)
    assert shapes["with_shape"] == shapes["intermediate"]
    path = folder / "model.onnx"
    onnx.save(proto, str(path))
    with torch.no_grad():
        fp, int8 = model(test).numpy(), converted(test).numpy()
    ort = runtime.run(runtime.session(path), {"x": test.numpy()})[0]
    return Result(fp, int8, ort, analyze(path), path, converted)


def assert_all_integer(result: Result, kernels: int) -> None:
    coverage = result.analysis["coverage"]
    assert coverage["integer"] == coverage["total"] == kernels, coverage
    assert not result.defects(), result.defects()


def seeded(build) -> nn.Module:
    """build() under seed 0 (the caller forks the RNG), BatchNorm statistics in realistic ranges, eval mode."""
    torch.manual_seed(0)
    module = build()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return module.eval()


# ------------------------------------------------------------------ TF "same" padding
class SamePad(nn.Module):
    """TF-style padding: an asymmetric zero pad before a strided conv, then a depthwise one."""

    def __init__(self, fill: float = 0.0):
        super().__init__()
        self.fill = fill
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU6())
        self.down = nn.Conv2d(16, 16, 3, stride=2)
        self.dw = nn.Conv2d(16, 16, 3, groups=16)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu6(self.down(F.pad(x, (0, 1, 0, 1), value=self.fill)))
        x = F.relu6(self.dw(F.pad(x, (1, 1, 1, 1), value=self.fill)))
        return self.head(x)


def test_zero_pad_folds_into_its_conv(tmp_path):
    with torch.random.fork_rng():
        result = quantize(seeded(SamePad), (2, 3, 16, 16), tmp_path)
    assert_all_integer(result, 4)
    ops = result.optimized_ops()
    assert "Pad" not in ops and ops["QLinearConv"] == 4
    assert sqnr_db(result.fp, result.ort) > 40  # measured 43.2 (target avx2; 43.7 with 8-bit weights on VNNI)


def test_a_pad_with_another_value_stays_and_is_reported(tmp_path):
    """Only a zero pad equals the zero-point padding of QLinearConv; a pad of 1 stays float, and the analysis
    says so."""
    with torch.random.fork_rng():
        result = quantize(seeded(lambda: SamePad(fill=1.0)), (2, 3, 16, 16), tmp_path)
    assert result.analysis["coverage"]["integer"] == 4
    pads = [i for i in result.defects() if i["op_type"] == "Pad"]
    assert len(pads) == 2 and {i["torch_op"] for i in pads} == {"aten.pad.default"}
    assert sqnr_db(result.fp, result.ort) > 35  # measured 39.3


# ------------------------------------------------------------------ SiLU, squeeze-excitation, global pooling
class SwishSE(nn.Module):
    """EfficientNet's pattern: conv-bn-SiLU, squeeze-excitation (mean, SiLU, Sigmoid gate, Mul), pooled head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU())
        self.reduce, self.expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True)))))
        x = self.project(x * gate)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_silu_and_squeeze_excitation_run_in_integer(tmp_path):
    with torch.random.fork_rng():
        result = quantize(seeded(SwishSE), (2, 3, 12, 12), tmp_path)
    assert_all_integer(result, 5)
    assert not result.analysis["islands"]
    ops = result.optimized_ops()
    assert ops["QLinearSigmoid"] == 3 and ops["QLinearMul"] == 3  # two SiLUs and the gate
    assert ops["QLinearGlobalAveragePool"] == 2 and "ReduceMean" not in ops
    assert sqnr_db(result.fp, result.ort) > 42  # measured 45.8


def test_silu_written_out_equals_it_in_fp32():
    from quantcli.quantizers.rewrites import decompose_gates

    with torch.random.fork_rng():
        model = seeded(SwishSE)
    x = torch.randn(4, 3, 12, 12)
    module = _torch.export_program(model, (x,), None).module()
    with torch.no_grad():
        before = module(x)
        assert decompose_gates(module, lambda node: True) == 2
        after = module(x)
    assert not [n for n in module.graph.nodes if "silu" in str(n.target)]
    assert torch.allclose(before, after, atol=1e-6)


# ------------------------------------------------------------------ channel split and concat (ShuffleNetV2)
class ChannelSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8))
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        a, b = F.relu(self.stem(x)).chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], dim=1)
        x = x.view(x.shape[0], 2, 8, *x.shape[2:]).transpose(1, 2).reshape(x.shape)  # channel shuffle
        return self.head(x)


def test_chunk_shuffle_and_cat_stay_integer(tmp_path):
    with torch.random.fork_rng():
        result = quantize(seeded(ChannelSplit), (2, 3, 8, 8), tmp_path)
    assert_all_integer(result, 4)
    assert not result.analysis["islands"]
    ops = result.optimized_ops()
    assert ops["QLinearConcat"] == 1 and ops["Split"] == 1
    assert sqnr_db(result.fp, result.ort) > 31  # measured 34.6


# ------------------------------------------------------------------ addmm (GPT-2's Conv1D), weight norm
class Conv1D(nn.Module):
    """transformers' Conv1D: the weight stored (in, out), y = addmm(bias, x, W)."""

    def __init__(self, nin: int, nout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nin, nout) * 0.2)
        self.bias = nn.Parameter(torch.randn(nout) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class AddmmMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.proj = Conv1D(16, 64), Conv1D(64, 16)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)))


def test_addmm_runs_as_qgemm_with_weights_per_channel_on_axis_1(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        result = quantize(AddmmMLP().eval(), (2, 16), tmp_path)
    assert_all_integer(result, 2)
    assert result.optimized_ops()["QGemm"] == 2
    model = onnx.load(str(result.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8
    ]
    assert len(weights) == 2
    for node in weights:
        values, scale = inits[node.input[0]], inits[node.input[1]]
        assert {a.name: a.i for a in node.attribute}["axis"] == 1 and scale.shape == (values.shape[1],)
    g = Graph(model.graph)
    biases = [g.constant(g.producer[n.input[2]].input[0]) for n in model.graph.node if n.op_type == "Gemm"]
    assert sorted(b.shape for b in biases) == [(16,), (64,)]  # int32 as ORT's QGemm reads them (a Cast of int16)
    assert all(b.dtype == np.int32 for b in biases)
    assert sqnr_db(result.fp, result.ort) > 30  # measured 33.9


class WeightNormConv(nn.Module):
    """wav2vec2's positional conv: a grouped Conv1d under weight norm (its weight computed from g and v)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv1d(4, 16, 3, padding=1)
        self.pos = nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 16, 5, padding=2, groups=4), dim=2)

    def forward(self, x):
        return self.pos(F.relu(self.inp(x)))


def test_weight_norm_conv_gets_int8_weights(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        result = quantize(WeightNormConv().eval(), (2, 4, 20), tmp_path)
    assert_all_integer(result, 2)
    model = onnx.load(str(result.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [
        inits[n.input[0]]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8
    ]
    assert [w.shape for w in weights] == [(16, 4, 3), (16, 4, 5)]  # the weight norm folded into int8 weights
    assert not [n for n in model.graph.node if n.op_type in ("ReduceL2", "Div", "Sqrt")]
    assert sqnr_db(result.fp, result.ort) > 26  # measured 30.0


# ------------------------------------------------------------------ where islands come from
class GeluBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 1))

    def forward(self, x):
        return self.body(x)


def test_islands_name_their_module_and_allowed_ones_are_marked(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        result = quantize(GeluBlock().eval(), (2, 3, 8, 8), tmp_path)
    islands = result.analysis["islands"]  # what ORT leaves of the GELU, named by the module it came from
    assert islands and {(i["allowed"], i["module"], i["module_type"], i["torch_op"]) for i in islands} == {
        (True, "body.1", "GELU", "aten.gelu.default")
    }, islands
    model = onnx.load(str(result.path))
    keys = {p.key for n in model.graph.node for p in n.metadata_props}
    assert keys == {onnx_export.ORIGIN_KEY}
    assert not any("/" in p.value for n in model.graph.node for p in n.metadata_props)  # no paths
    gelu = [n for n in model.graph.node if onnx_export.origin(n)["torch_op"] == "aten.gelu.default"]
    assert gelu and {onnx_export.origin(n)["module"] for n in gelu} == {"body.1"}
    assert {onnx_export.origin(n)["module_type"] for n in gelu} == {"GELU"}


def _qdq_graph(body: list, inputs: list, extra_inits: list = ()) -> onnx.ModelProto:
    """x (uint8, 1x4x6x6) -> DQ -> body -> Q -> DQ -> y, all at scale 0.1 and zero point 10."""
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(10, np.uint8), "z"),
        *extra_inits,
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xf"], name="dq_in"),
        *body,
        helper.make_node("QuantizeLinear", ["yf", "s", "z"], ["yq"], name="q_out"),
        helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"], name="dq_out"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return onnx.shape_inference.infer_shapes(model)


def _islands_of(model: onnx.ModelProto, folder: Path) -> list:
    path = folder / "g.onnx"
    onnx.save(model, str(path))
    return [(i["op_type"], i["allowed"]) for i in analyze(path)["islands"]]


def test_island_definition_on_hand_built_graphs(tmp_path):
    tanh = [helper.make_node("Tanh", ["xf"], ["yf"], name="tanh")]
    assert _islands_of(_qdq_graph(tanh, ["x"]), tmp_path) == [("Tanh", False)]
    params = [
        numpy_helper.from_array(np.ones(6, np.float32), "g"),
        numpy_helper.from_array(np.zeros(6, np.float32), "b"),
    ]
    norm = [helper.make_node("LayerNormalization", ["xf", "g", "b"], ["yf"], name="norm")]
    assert _islands_of(_qdq_graph(norm, ["x"], params), tmp_path) == [("LayerNormalization", True)]
    # beyond a float-by-design op the values are float by design: LayerNormalization -> Tanh
    norm = [
        helper.make_node("LayerNormalization", ["xf", "g", "b"], ["n"], name="norm"),
        helper.make_node("Tanh", ["n"], ["yf"], name="tanh"),
    ]
    assert _islands_of(_qdq_graph(norm, ["x"], params), tmp_path) == [("LayerNormalization", True)]
    # ORT runs a quantized Softmax as QLinearSoftmax: no island at all
    softmax = [helper.make_node("Softmax", ["xf"], ["yf"], name="softmax")]
    assert _islands_of(_qdq_graph(softmax, ["x"]), tmp_path) == []


def test_ops_behind_an_integer_kernels_float_output_are_counted_apart():
    """QGemm without an output scale dequantizes its own result: the Add after it, then a QuantizeLinear, is float
    between integers, which only `from_float_kernels` sees (the sweep counts it apart)."""
    from quantcli.onnx.islands import island_nodes

    scalar = lambda name, value, dtype: numpy_helper.from_array(np.array(value, dtype), name)  # noqa: E731
    inits = [
        scalar("s", 0.1, np.float32),
        scalar("z", 128, np.uint8),
        numpy_helper.from_array(np.ones((4, 4), np.int8), "w"),
        scalar("ws", 0.01, np.float32),
        scalar("wz", 0, np.int8),
        numpy_helper.from_array(np.ones(4, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("QGemm", ["x", "s", "z", "w", "ws", "wz"], ["g"], domain="com.microsoft", transB=1),
        helper.make_node("Add", ["g", "one"], ["a"]),
        helper.make_node("QuantizeLinear", ["a", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [2, 4])],
        inits,
    )
    assert island_nodes(graph) == []
    assert [n.op_type for n in island_nodes(graph, from_float_kernels=True)] == ["Add"]
    graph.node[0].input.extend(["", "s", "z"])  # no bias, an output scale: a uint8 output, no float path from it
    assert island_nodes(graph, from_float_kernels=True) == []


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]


X = np.random.default_rng(0).integers(0, 256, (1, 4, 6, 6), dtype=np.uint8)
AXES = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")


@pytest.mark.parametrize("keepdims", [1, 0])
def test_spatial_mean_becomes_global_average_pool(keepdims):
    body = [helper.make_node("ReduceMean", ["xf", "axes"], ["yf"], name="mean", keepdims=keepdims)]
    model = _qdq_graph(body, ["x"], [AXES])
    before = _ort(model, X)
    assert rewrite.global_average_pools(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "ReduceMean" not in ops and "GlobalAveragePool" in ops
    if not keepdims:  # the squeeze runs after the QuantizeLinear, on the integers
        assert ops.index("Squeeze") == ops.index("QuantizeLinear") + 1
    onnx.checker.check_model(
        onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True), full_check=True
    )
    after = _ort(model, X)
    assert after.shape == before.shape == ((1, 4, 1, 1) if keepdims else (1, 4))
    assert np.abs(after - before).max() <= 0.1 + 1e-6 and (after == before).mean() > 0.9


def test_other_means_stay():
    channels = numpy_helper.from_array(np.array([1], np.int64), "axes")
    model = _qdq_graph([helper.make_node("ReduceMean", ["xf", "axes"], ["yf"], name="mean")], ["x"], [channels])
    assert rewrite.global_average_pools(model) == 0
    # keepdims=0 with a float consumer: the squeeze has nowhere integer to go
    body = [
        helper.make_node("ReduceMean", ["xf", "axes"], ["m"], name="mean", keepdims=0),
        helper.make_node("Tanh", ["m"], ["t"]),
        helper.make_node("Unsqueeze", ["t", "axes"], ["yf"]),
    ]
    assert rewrite.global_average_pools(_qdq_graph(body, ["x"], [AXES])) == 0


def test_zero_pad_between_equal_qdq_runs_on_the_integers():
    pads = numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 0, 0, 1], np.int64), "pads")
    model = _qdq_graph([helper.make_node("Pad", ["xf", "pads"], ["yf"], name="pad")], ["x"], [pads])
    before = _ort(model, X)
    assert rewrite.integer_data_movement(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Pad", "DequantizeLinear"]  # the zero point pads the uint8 tensor
    onnx.checker.check_model(
        onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True), full_check=True
    )
    np.testing.assert_array_equal(_ort(model, X), before)


def test_data_movement_with_other_parameters_at_its_exit_stays():
    body = [
        helper.make_node("Transpose", ["xf"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("QuantizeLinear", ["t", "s2", "z"], ["tq"]),
        helper.make_node("DequantizeLinear", ["tq", "s2", "z"], ["yf"]),
    ]
    model = _qdq_graph(body, ["x"], [numpy_helper.from_array(np.array(0.2, np.float32), "s2")])
    assert rewrite.integer_data_movement(model) == 0


def test_a_positive_scalar_between_equal_integers_goes():
    """x * c quantized with x's scale times c (a query scaling) is the identity on the integers."""
    inits = [
        numpy_helper.from_array(np.array(0.25, np.float32), "c"),
        numpy_helper.from_array(np.array(0.025, np.float32), "s2"),
    ]
    body = [
        helper.make_node("Mul", ["xf", "c"], ["m"], name="mul"),
        helper.make_node("QuantizeLinear", ["m", "s2", "z"], ["mq"]),
        helper.make_node("DequantizeLinear", ["mq", "s2", "z"], ["yf"]),
    ]
    model = _qdq_graph(body, ["x"], inits)
    before = _ort(model, X)
    assert rewrite.scaled_passthroughs(model) == 1
    assert [n.op_type for n in model.graph.node].count("Mul") == 0
    onnx.checker.check_model(
        onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True), full_check=True
    )
    np.testing.assert_array_equal(_ort(model, X), before)


# ------------------------------------------------------------------ a query scaled before its matmul (Swin)
class ScaledQuery(nn.Module):
    """q * head_dim**-0.5 before q @ k^T, as torchvision's Swin writes it."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 16).permute(2, 0, 1, 3)
        attn = (q * 16**-0.5).matmul(k.transpose(-2, -1)).softmax(-1)
        return self.proj(attn.matmul(v))


def test_a_scaled_query_keeps_integers_between_its_matmuls(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        result = quantize(ScaledQuery().eval(), (2, 6, 16), tmp_path)
    assert_all_integer(result, 4)
    assert "Mul" not in result.optimized_ops()  # x * c kept x's integers, its scale times c
    assert not result.analysis["islands"]
    assert sqnr_db(result.fp, result.ort) > 34  # measured 37.4


class SdpaAttention(nn.Module):
    """F.scaled_dot_product_attention, as transformers' encoders call it: the quantizer writes it out."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], 16))


def test_written_out_attention_scales_its_query_not_its_scores(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        result = quantize(SdpaAttention().eval(), (2, 6, 16), tmp_path)
    assert_all_integer(result, 4)
    assert "Mul" not in result.optimized_ops()  # a Mul on the scores would run in float on L x L values
    assert sqnr_db(result.fp, result.ort) > 30  # measured 36.5


# ------------------------------------------------------------------ QAT
@pytest.mark.parametrize(
    "build,shape",
    [
        (lambda: seeded(SamePad), (2, 3, 16, 16)),
        (lambda: seeded(SwishSE), (2, 3, 12, 12)),
        (lambda: seeded(ChannelSplit), (2, 3, 8, 8)),
        (AddmmMLP, (2, 16)),
        (WeightNormConv, (2, 4, 20)),
        (ScaledQuery, (2, 6, 16)),
    ],
    ids=["pad", "silu", "split", "addmm", "weight_norm", "scaled_query"],
)
@pytest.mark.slow
def test_qat_fake_quantizes_the_new_patterns_and_converts_to_the_trained_model(build, shape):
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build().train()
    x = torch.randn(8, *shape[1:], generator=g)
    section = quantizers.resolve(QuantizationSection())
    program = _torch.export_program(model, (x,), ({0: torch.export.Dim("batch")},))
    prepared = _torch.prepare(program.module(), quantizers.build(section, qat=True), True)
    assert _torch.fake_quantizers(prepared)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(3):
        loss = prepared(torch.randn(8, *shape[1:], generator=g)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _torch.to_eval(prepared)
    _torch.disable_observers(prepared)
    with torch.no_grad():
        trained = prepared(x)
        converted = _torch.convert(prepared, True)
        assert sqnr_db(trained.numpy(), converted(x).numpy()) > 50
