"""int32 biases stored narrow, their scale computed (quantcli.onnx.biases): ORT fuses and computes as before."""

from __future__ import annotations

import collections
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantcli.onnx import biases
from quantcli.onnx import export as onnx_export
from quantcli.onnx.graph import Graph

X_SCALE = np.float32(0.02)


def _model(
    bias_codes: np.ndarray,
    gemm_codes: np.ndarray | None = None,
    *,
    channels: tuple[int, int] = (64, 48),
    scale_is_product: bool = True,
    bias_read_elsewhere: bool = False,
) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ int8 weight, DQ int32 bias) -> Q -> DQ -> Flatten -> Q -> DQ -> Gemm(same form) -> Q
    -> DQ -> y, as the exporter writes a quantized program: every bias with its own scale [N] and an int32 zero
    point of zeros."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def add(name, array):
        inits.append(numpy_helper.from_array(array, name))
        return name

    def layer(op, x, n, k, shape, codes, out, **attrs):
        w_scale = (rng.uniform(0.002, 0.01, n)).astype(np.float32)
        stored = X_SCALE * w_scale if scale_is_product else (X_SCALE * w_scale * np.float32(1.5))
        weight = rng.integers(-127, 128, (n, *shape)).astype(np.int8)
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [add(f"{op}.w", weight), add(f"{op}.ws", w_scale), add(f"{op}.wz", np.zeros(n, np.int8))],
                [f"{op}.wd"],
                axis=0,
            )
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [
                    add(f"{op}.b", np.resize(codes, n).astype(np.int32)),
                    add(f"{op}.bs", stored.astype(np.float32)),
                    add(f"{op}.bz", np.zeros(n, np.int32)),
                ],
                [f"{op}.bd"],
                axis=0,
            )
        )
        nodes.append(helper.make_node(op, [x, f"{op}.wd", f"{op}.bd"], [out], **attrs))

    nodes.append(helper.make_node("QuantizeLinear", ["x", add("xs", X_SCALE), add("xz", np.uint8(128))], ["xq"]))
    nodes.append(helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]))
    c, f = channels
    layer("Conv", "xd", c, 3, (3, 3, 3), bias_codes, "c")
    nodes.append(helper.make_node("QuantizeLinear", ["c", "xs", "xz"], ["cq"]))
    nodes.append(helper.make_node("DequantizeLinear", ["cq", "xs", "xz"], ["cd"]))
    nodes.append(helper.make_node("Flatten", ["cd"], ["f"]))
    nodes.append(helper.make_node("QuantizeLinear", ["f", "xs", "xz"], ["fq"]))
    nodes.append(helper.make_node("DequantizeLinear", ["fq", "xs", "xz"], ["fd"]))
    layer("Gemm", "fd", f, c * 4 * 4, (c * 4 * 4,), bias_codes if gemm_codes is None else gemm_codes, "g", transB=1)
    nodes.append(helper.make_node("QuantizeLinear", ["g", "xs", "xz"], ["gq"]))
    nodes.append(helper.make_node("DequantizeLinear", ["gq", "xs", "xz"], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, f])]
    if bias_read_elsewhere:  # the Conv's codes also an output of the graph
        nodes.append(helper.make_node("Identity", ["Conv.b"], ["codes"]))
        outputs.append(helper.make_tensor_value_info("codes", TensorProto.INT32, [c]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])
    graph = helper.make_graph(nodes, "g", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, optimized: bool) -> tuple[list[np.ndarray], collections.Counter]:
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = f"{tmp}/opt.onnx"
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(1).uniform(-2, 2, (2, 3, 6, 6)).astype(np.float32)
        outputs = session.run(None, {"x": x})
        ops = collections.Counter(n.op_type for n in onnx.load(f"{tmp}/opt.onnx").graph.node)
    return outputs, ops


def _bias_dqs(model: onnx.ModelProto) -> list:
    g = Graph(model.graph)
    return [g.producer[n.input[2]] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]


@pytest.mark.parametrize(("codes", "stored"), [(np.arange(-600, 600, 150), np.int16), (np.arange(-4, 4), np.int8)])
def test_biases_are_stored_narrow_with_their_scale_computed_and_run_as_before(codes, stored):
    before = _model(codes)
    after = _model(codes)
    assert biases.compact(after) == 2
    g = Graph(after.graph)
    for dq in _bias_dqs(after):
        assert len(dq.input) == 2  # no zero point
        cast, mul = g.producer[dq.input[0]], g.producer[dq.input[1]]
        assert cast.op_type == "Cast" and g.initializer(cast.input[0]).dtype == stored
        layer = g.consumers[dq.output[0]][0]
        assert mul.op_type == "Mul" and list(mul.input) == [g.producer[layer.input[i]].input[1] for i in (0, 1)]
    names = {t.name for t in after.graph.initializer}
    assert not names & {"Conv.bs", "Conv.bz", "Gemm.bs", "Gemm.bz", "Conv.b", "Gemm.b"}
    saved = sum(n * (4 + 4 + 4 - np.dtype(stored).itemsize) for n in (64, 48))  # scale, zero point, codes
    assert after.ByteSize() < before.ByteSize() - saved / 2
    onnx.checker.check_model(after, full_check=True)
    for optimized in (True, False):
        (expected,), ops_before = _run(before, optimized)
        (got,), ops_after = _run(after, optimized)
        np.testing.assert_array_equal(got, expected)
        if optimized:  # the same fused graph: ORT folds the Mul and the Cast when it loads the model
            assert ops_after == ops_before
            assert ops_after["QLinearConv"] == 1 and ops_after["QGemm"] == 1


def test_a_bias_too_wide_for_int16_a_scale_not_the_product_and_codes_read_elsewhere_stay():
    wide = _model(np.arange(8) * 10_000)
    biases.compact(wide)
    assert all(Graph(wide.graph).inits.get(dq.input[0]) is not None for dq in _bias_dqs(wide))  # int32, no Cast

    other = _model(np.arange(8), scale_is_product=False)
    biases.compact(other)
    assert [dq.input[1] for dq in _bias_dqs(other)] == ["Conv.bs", "Gemm.bs"]  # kept as stored
    assert all(len(dq.input) == 2 for dq in _bias_dqs(other))  # the zero point of zeros still goes

    few = _model(np.arange(8), channels=(2, 3))  # a few channels: a Mul or a Cast costs more than it saves
    biases.compact(few)
    assert [tuple(dq.input) for dq in _bias_dqs(few)] == [("Conv.b", "Conv.bs"), ("Gemm.b", "Gemm.bs")]

    # the exporter keeps one int32 tensor of zeros for a bias of zeros and the zero points of every bias
    zeros = _model(np.zeros(8), gemm_codes=np.arange(8), channels=(64, 64))
    assert onnx_export.share_constants(zeros) > 0
    assert _bias_dqs(zeros)[0].input[0] == _bias_dqs(zeros)[1].input[2]
    expected, _ = _run(zeros, True)
    biases.compact(zeros)
    assert all(len(dq.input) == 2 for dq in _bias_dqs(zeros))
    got, _ = _run(zeros, True)
    np.testing.assert_array_equal(got[0], expected[0])

    shared = _model(np.arange(8), bias_read_elsewhere=True)
    biases.compact(shared)
    assert _bias_dqs(shared)[0].input[0] == "Conv.b"
    before, _ = _run(_model(np.arange(8), bias_read_elsewhere=True), True)
    after, _ = _run(shared, True)
    for expected, got in zip(before, after):
        np.testing.assert_array_equal(got, expected)
