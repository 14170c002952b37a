"""Weight-only weights in the ONNX file: stored int4/int8 [K, N] behind a blocked DequantizeLinear that ONNX
Runtime fuses with its MatMul or Gemm into MatMulNBits, in every form the exporter writes a linear's weight,
with a K the block does not divide; the numbers DequantizeLinear gives are the PyTorch weight-only model's."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quantcli.errors import ModelError
from quantcli.onnx import blocked
from quantcli.weightonly.grid import Grid
from quantcli.weightonly.rtn import rtn

K, N = 80, 48  # 80 = 2.5 blocks of 32: a short last block


def float_model(weights: list[np.ndarray], bias: np.ndarray) -> onnx.ModelProto:
    """Three linears in the forms the exporter writes: MatMul of a folded [K, N] transpose, MatMul of a
    Transpose of [N, K], Gemm (2-D input, transB=1, bias) of [N, K]; each weight given [N, K]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "m", K])
    x2 = helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["m", K])
    outputs = [
        helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, "m", N] if i < 2 else ["m", N]) for i in range(3)
    ]
    initializers = [
        numpy_helper.from_array(np.ascontiguousarray(weights[0].T), "w0_t"),
        numpy_helper.from_array(weights[1], "w1"),
        numpy_helper.from_array(weights[2], "w2"),
        numpy_helper.from_array(bias, "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0_t"], ["y0"], name="matmul0"),
        helper.make_node("Transpose", ["w1"], ["w1_t"], perm=[1, 0], name="transpose1"),
        helper.make_node("MatMul", ["x", "w1_t"], ["y1"], name="matmul1"),
        helper.make_node("Gemm", ["x2", "w2", "b2"], ["y2"], transB=1, name="gemm2"),
    ]
    graph = helper.make_graph(nodes, "linears", [x, x2], outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def optimized(model: onnx.ModelProto, tmp_path, level) -> tuple[onnx.ModelProto, ort.InferenceSession]:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx")), session


GRIDS = [Grid(4, True, 32), Grid(4, False, 16), Grid(8, True, None), Grid(8, False, 64)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g.bits}bit-{'sym' if g.symmetric else 'asym'}-{g.block_size}")
def test_every_linear_form_becomes_matmul_nbits_with_the_dequantized_weights(grid, tmp_path):
    g = torch.Generator().manual_seed(0)
    float_weights = [torch.randn(N, K, generator=g) for _ in range(3)]
    results = [rtn(w, grid) for w in float_weights]
    bias = np.linspace(-1, 1, N, dtype=np.float32)
    model = float_model([r.weight().numpy() for r in results], bias)
    layers = [({"module": f"layer{i}"}, r) for i, r in enumerate(results)]
    assert blocked.store(model, layers) == 3
    onnx.checker.check_model(model, full_check=True)

    names = {t.name: t for t in model.graph.initializer}
    assert not {"w0_t", "w1", "w2"} & set(names) and not any(n.op_type == "Transpose" for n in model.graph.node)
    codes = names["layer0.weight_q"]
    assert list(codes.dims) == [K, N] and len(codes.raw_data) == K * N * grid.bits // 8  # 4 bits a weight
    expected_type = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4}.get((grid.bits, grid.symmetric))
    assert codes.data_type == (expected_type or codes.data_type)
    assert ("layer0.weight_zero" in names) == (not grid.symmetric)

    x = np.random.default_rng(1).standard_normal((1, 5, K)).astype(np.float32)
    feeds = {"x": x, "x2": x[0]}
    want = [x @ results[0].weight().numpy().T, x @ results[1].weight().numpy().T]
    want.append(x[0] @ results[2].weight().numpy().T + bias)
    _, plain = optimized(model, tmp_path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for got, ref in zip(plain.run(None, feeds), want):  # DequantizeLinear's weights are the PyTorch model's
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)

    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        graph, session = optimized(model, tmp_path, level)
        ops = [n.op_type for n in graph.graph.node]
        assert ops.count("MatMulNBits") == 3 and not {"MatMul", "Gemm", "DequantizeLinear"} & set(ops), ops
        fused = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
        attrs = [{a.name: a.i for a in n.attribute} for n in fused]
        assert all((a["bits"], a["K"], a["N"]) == (grid.bits, K, N) for a in attrs)
        if grid.block_size:
            assert all(a["block_size"] == grid.block_size for a in attrs)
        for got, ref in zip(session.run(None, feeds), want):  # accuracy level 4: the input quantized to int8
            assert np.linalg.norm(got - ref) < 0.02 * np.linalg.norm(ref)


@pytest.mark.parametrize("grid", [g for g in GRIDS if g.block_size], ids=str)
def test_the_runtime_form_is_the_matmul_nbits_ort_fuses_the_dequantized_form_into(grid, tmp_path):
    """Written as MatMulNBits, the two linears that read x as one call and a Split: the same outputs, bit for bit,
    as ORT's fusion of the DequantizeLinear form."""
    g = torch.Generator().manual_seed(5)
    results = [rtn(torch.randn(N, K, generator=g), grid) for _ in range(3)]
    layers = [({"module": f"layer{i}"}, r) for i, r in enumerate(results)]
    bias = np.linspace(-1, 1, N, dtype=np.float32)
    dequantized, direct = (float_model([r.weight().numpy() for r in results], bias) for _ in range(2))
    blocked.store(dequantized, layers)
    assert blocked.store(direct, layers, runtime_form=True) == 3
    onnx.checker.check_model(direct, full_check=True)
    ops = [n.op_type for n in direct.graph.node]
    assert ops == ["MatMulNBits", "Split", "MatMulNBits"], ops  # nothing for ORT to fuse; the Gemm's bias its own
    assert not [
        t.name for t in direct.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) == N * K
    ]
    x = np.random.default_rng(6).standard_normal((1, 5, K)).astype(np.float32)
    feeds = {"x": x, "x2": x[0]}
    (fused, a), (written, b) = (
        optimized(m, tmp_path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL) for m in (dequantized, direct)
    )

    def kernels(nodes):  # the fusion also writes weight_prepacked=0, the attribute's default
        return [sorted((a.name, a.i) for a in n.attribute if a.name != "weight_prepacked") for n in nodes]

    fused_kernels = kernels(n for n in fused.graph.node if n.op_type == "MatMulNBits")
    assert len(fused_kernels) == 3 and fused_kernels[0] == fused_kernels[1]
    merged = [dict(k) for k in kernels(n for n in written.graph.node if n.op_type == "MatMulNBits")]
    assert [k["N"] for k in merged] == [2 * N, N] and merged[0] == {**dict(fused_kernels[0]), "N": 2 * N}
    for got, want in zip(b.run(None, feeds), a.run(None, feeds)):  # each column from the same codes and input
        np.testing.assert_array_equal(got, want)


def test_a_layer_the_graph_does_not_hold_is_an_error():
    g = torch.Generator().manual_seed(2)
    results = [rtn(torch.randn(N, K, generator=g), Grid(4, True, 32)) for _ in range(3)]
    model = float_model(
        [r.weight().numpy() for r in results[:2]] + [np.zeros((N, K), np.float32)], np.zeros(N, np.float32)
    )
    with pytest.raises(ModelError, match="reads the quantized weight of layer2"):
        blocked.store(model, [({"module": f"layer{i}"}, r) for i, r in enumerate(results)])


def embedding_model(table: np.ndarray, untied: np.ndarray) -> onnx.ModelProto:
    """A tied table read by a Gather and, as the LM head, a MatMul of its Transpose; an untied table's Gather."""
    v, h = table.shape
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "m", h])
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
        for name, shape in (("tied", [1, "s", h]), ("logits", [1, "m", v]), ("untied", [1, "s", h]))
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["tied"], name="embed"),
        helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "table_t"], ["logits"], name="head"),
        helper.make_node("Gather", ["other", "ids"], ["untied"], name="embed2"),
    ]
    initializers = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(untied, "other")]
    model = helper.make_model(
        helper.make_graph(nodes, "tables", [ids, x], outputs, initializers), opset_imports=[helper.make_opsetid("", 21)]
    )
    model.ir_version = 10
    return model


@pytest.mark.parametrize("grid", [Grid(4, True, 32), Grid(4, False, 16), Grid(8, True, 32)], ids=str)
def test_embeddings_become_gather_block_quantized_one_table_shared_with_the_tied_head(grid, tmp_path):
    g = torch.Generator().manual_seed(3)
    head, other = rtn(torch.randn(N, K, generator=g), grid), rtn(torch.randn(N, K, generator=g), grid)
    model = embedding_model(head.weight().numpy(), other.weight().numpy())
    setting = {"dtype": f"int{grid.bits}", "symmetric": grid.symmetric, "block_size": grid.block_size}
    layers = [
        ({"kind": "linear", "module": "lm_head", **setting}, head),
        ({"kind": "embedding", "module": "embed", "tied_to": 0, **setting}, head),
        ({"kind": "embedding", "module": "embed2", **setting}, other),
    ]
    assert blocked.store(model, layers) == 1
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 2 and ops.count("MatMulNBits") == 1 and "Gather" not in ops
    assert ops.count("Slice") == (2 if K % grid.block_size else 0)  # a last block padded in the packed rows, sliced
    floats = [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2]
    assert sorted(floats) == ["embed2.weight_scales", "lm_head.weight_scales"]  # no float table left
    packed = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.UINT8}
    blocks = -(-K // grid.block_size)
    assert list(packed["lm_head.weight_packed"].dims) == [N, blocks, grid.block_size * grid.bits // 8]
    gathers = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    assert reshape.input[0] == "lm_head.weight_packed" and gathers[0].input[0] == reshape.output[0]  # one table

    ids = np.array([[0, 7, 47, 7]])
    x = np.random.default_rng(4).standard_normal((1, 3, K)).astype(np.float32)
    for optimize in (False, True):
        level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        _, session = optimized(model, tmp_path, level)
        tied, logits, untied = session.run(None, {"ids": ids, "x": x})
        np.testing.assert_array_equal(tied, head.weight().numpy()[ids])  # exactly the PyTorch model's rows
        np.testing.assert_array_equal(untied, other.weight().numpy()[ids])
        want = x @ head.weight().numpy().T
        assert np.linalg.norm(logits - want) < 0.02 * np.linalg.norm(want)  # accuracy level 4
