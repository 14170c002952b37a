"""The quantizer registry and the onnxruntime target on the models in tests/models.py.

The pipelines here run in-process: torch.export -> prepare_pt2e -> calibrate -> convert_pt2e ->
torch.export -> torch.onnx (dynamo) -> ONNX Runtime with every graph optimization on.
SQNR floors sit a few dB under the values measured on the reference machine, so a quantizer
that quantizes LayerNorm/Softmax, uses 8-bit weights where ORT saturates, or leaves convs in
float misses them.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from quantcli import (
    _torch,  # silences torch/torchao import noise; the one torch gateway
    quantizers,
)
from quantcli.errors import RecipeError
from quantcli.onnx.fusion import integer_op_report
from quantcli.quantizers.cpu import classify, cpu_flags, saturates_u8s8
from quantcli.recipe import QuantizationSection
from tests.models import MODELS, SEQ, VOCAB, TinyBert, example_batch
from tests.tolerances import QUANTIZATION

torch = _torch.torch
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers
def sqnr_db(ref: np.ndarray, other: np.ndarray) -> float:
    ref, other = np.asarray(ref, np.float64), np.asarray(other, np.float64)
    return float(10 * np.log10((ref**2).sum() / max(((ref - other) ** 2).sum(), 1e-30)))


def leaves(out) -> list[np.ndarray]:
    return [t.detach().numpy() for t in torch.utils._pytree.tree_leaves(out)]


def section(**kw) -> QuantizationSection:
    """A resolved section for the tests' target (tolerances.TARGET) unless `kw` names another."""
    return quantizers.resolve(QuantizationSection(**{**QUANTIZATION, **kw}))


def capture(model, batch: dict):
    args = tuple(batch.values())
    dynamic = tuple({0: torch.export.Dim("batch")} for _ in args)
    return torch.export.export(model, args, dynamic_shapes=dynamic, strict=False), dynamic


def prepare(model, batch: dict, q: QuantizationSection, qat: bool = False):
    program, _ = capture(model, batch)
    return _torch.prepare(program.module(), quantizers.build(q, qat=qat), qat)


@dataclass
class Quantized:
    prepared: object  # converted in place by convert_pt2e: read `observed` for its observers
    observed: list  # dtypes of the values observers saw
    converted: object
    fp: list[np.ndarray]
    int8: list[np.ndarray]
    ort: list[np.ndarray]
    report: dict


def quantize(
    model, calib: list[dict], test: dict, folder: Path, q: QuantizationSection | None = None, to_onnx: bool = True
) -> Quantized:
    import onnx
    import onnxruntime as ort

    q = q or section()
    prepared = prepare(model, calib[0], q)
    with torch.no_grad():
        for batch in calib:
            prepared(*batch.values())
    observed = [n.meta["val"].dtype for n in observed_nodes(prepared)]
    converted = _torch.convert(prepared, fold_quantize=True)
    with torch.no_grad():
        fp, int8 = leaves(model(*test.values())), leaves(converted(*test.values()))
    if not to_onnx:
        return Quantized(prepared, observed, converted, fp, int8, [], {})
    program, _ = capture(converted, calib[0])
    path = folder / "model.onnx"
    torch.onnx.export(program, (), dynamo=True, external_data=False, verbose=False, input_names=list(test)).save(
        str(path)
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ort_out = session.run(None, {k: v.numpy() for k, v in test.items()})
    return Quantized(prepared, observed, converted, fp, int8, ort_out, integer_op_report(path))


def observed_nodes(prepared) -> list:
    """The graph nodes whose value an observer or fake quantizer sees."""
    return [
        n.args[0]
        for n in prepared.graph.nodes
        if n.op == "call_module" and n.target.startswith("activation_post_process_")
    ]


def model_data(name: str, batches: int = 4, batch: int = 16):
    calib = [example_batch(name, batch, seed=i) for i in range(batches)]
    return calib, example_batch(name, batch, seed=100)


# ------------------------------------------------------------------ every model
# Each architecture also runs through the CLI, stage by stage as separate processes, with its
# SQNR floors and integer-kernel counts: tests/test_cli_chain.py.


def test_hf_bert_mask_path_has_no_observers():
    calib, _ = model_data("hf_bert", batches=1)
    prepared = prepare(MODELS["hf_bert"][0](), calib[0], section())
    integer = {
        n
        for n in prepared.graph.nodes
        if n.op == "call_function" and hasattr(n.meta.get("val"), "dtype") and not n.meta["val"].dtype.is_floating_point
    }
    assert any(n.meta["val"].dtype == torch.bool for n in integer)  # the mask really is in the graph
    assert not any(u.op == "call_module" for n in integer for u in n.users)
    with torch.no_grad():
        out = prepared(*calib[0].values())
    assert all(np.isfinite(o).all() for o in leaves(out))


def test_weights_are_int8_symmetric_per_channel_and_7bit_with_reduce_range(tmp_path):
    import onnx
    from onnx import numpy_helper

    calib, test = model_data("two_io", batches=1, batch=4)
    for reduce_range, limit in ((False, 127), (True, 63)):
        quantize(MODELS["two_io"][0](), calib, test, tmp_path, section(reduce_range=reduce_range))
        model = onnx.load(str(tmp_path / "model.onnx"))
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        weights = [
            n
            for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8
        ]
        assert len(weights) == 5  # two convs, three linears
        for node in weights:
            values, zero = inits[node.input[0]], inits[node.input[2]]
            assert {a.name: a.i for a in node.attribute}.get("axis", 1) == 0
            assert zero.shape == (values.shape[0],) and not zero.any()
            assert np.abs(values).max() == limit


# ------------------------------------------------------------------ registry, CPU, config
def test_import_does_not_load_torch():
    code = (
        "import sys, quantcli.quantizers as q; from quantcli.recipe import QuantizationSection; "
        "q.resolve(QuantizationSection()); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_build_refuses_an_unresolved_section():
    with pytest.raises(RecipeError):
        quantizers.build(QuantizationSection(), qat=False)


@pytest.mark.parametrize(
    "machine,flags,name,saturates",
    [
        ("x86_64", "fpu sse avx avx2 fma", "avx2", True),
        ("x86_64", "avx avx2 avx512f avx512bw", "avx512", True),
        ("x86_64", "avx avx2 avx512f avx512_vnni", "vnni", False),
        ("x86_64", "avx avx2 avx_vnni", "vnni", False),
        ("aarch64", "fp asimd asimddp", "arm64", False),
    ],
)
def test_cpu_classes(machine, flags, name, saturates):
    text = f"processor\t: 0\nflags\t\t: {flags}\n" if machine == "x86_64" else f"Features\t: {flags}\n"
    assert classify(machine, cpu_flags(text)) == name
    assert saturates_u8s8(name) is saturates


def test_resolve_replaces_only_auto():
    auto = quantizers.resolve(QuantizationSection())
    assert auto.target_cpu in ("avx2", "avx512", "vnni", "arm64")
    assert auto.reduce_range == ("pair_safe" if saturates_u8s8(auto.target_cpu) else False)
    fixed = quantizers.resolve(QuantizationSection(target_cpu="avx2", reduce_range=False))
    assert (fixed.target_cpu, fixed.reduce_range) == ("avx2", False)
    assert quantizers.resolve(QuantizationSection(target_cpu="avx2")).reduce_range == "pair_safe"
    assert quantizers.resolve(QuantizationSection(target_cpu="avx512")).reduce_range == "pair_safe"
    assert quantizers.resolve(QuantizationSection(target_cpu="vnni")).reduce_range is False
    assert quantizers.resolve(QuantizationSection(target_cpu="avx2", reduce_range=True)).reduce_range is True


def _saturating_u8s8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MLAS's AVX2 u8s8 kernel (vpmaddubsw): adjacent u8*s8 products summed in int16, saturated."""
    a, b = a.astype(np.int64), b.astype(np.int64)
    prod = a[:, :, None] * b[None, :, :]
    return np.clip(prod[:, 0::2] + prod[:, 1::2], -32768, 32767).sum(1)


def test_reduce_range_avoids_u8s8_saturation_on_avx2():
    """On x86 without VNNI, 8-bit weights overflow the int16 pair sums; 7-bit and pair-safe weights cannot.

    The host may have VNNI, so the AVX2 kernel is emulated on the real quantized first layer of the MLP.
    """
    calib, test = model_data("mlp", batches=2, batch=64)
    results = {}
    for reduce_range in (False, True, "pair_safe"):
        q = quantizers.resolve(QuantizationSection(target_cpu="avx2", reduce_range=reduce_range))
        prepared = prepare(MODELS["mlp"][0](), calib[0], q)
        with torch.no_grad():
            for batch in calib:
                prepared(*batch.values())
        converted = _torch.convert(prepared, fold_quantize=True)
        fc1 = next(n for n in converted.graph.nodes if n.target == torch.ops.aten.linear.default)
        dq_x, dq_w = fc1.args[0], fc1.args[1]
        interpreter = torch.fx.Interpreter(converted, garbage_collect_values=False)
        with torch.no_grad():
            interpreter.run(test["x"])
        a = interpreter.env[dq_x.args[0]].numpy()  # fc1's input as the uint8 tensor ORT multiplies
        w = getattr(converted, dq_w.args[0].target).numpy().T
        assert a.dtype == np.uint8 and w.dtype == np.int8
        offset = int(dq_x.args[2]) * w.astype(np.int64).sum(0)  # the zero-point term ORT subtracts
        exact = a.astype(np.int64) @ w.astype(np.int64) - offset
        results[reduce_range] = sqnr_db(exact, _saturating_u8s8(a, w) - offset)
    assert results[True] > 100  # exact: |a*b + a*b| <= 2*255*63 = 32130 < 32767
    assert results["pair_safe"] > 100  # exact: same-sign |q + q| <= 128, 128*255 = 32640
    assert results[False] < 25  # measured 17.6 dB


@pytest.mark.parametrize("qat", [False, True])
def test_pair_safe_weights_are_finer_than_7_bits_and_never_saturate(qat):
    """Pair-safe: no pair of any pairing layer (in ORT's K order) can overflow int16 for any uint8 input,
    |q| <= 127, and each channel's scale is at most the 7-bit one (finer); depthwise convs keep 8 bits."""
    from quantcli.quantizers import pair_safety
    from quantcli.quantizers.pairs import k_rows, saturable

    calib, _ = model_data("mobilenet_v2", batches=1, batch=8)
    q = quantizers.resolve(QuantizationSection(target_cpu="avx2"))
    prepared = prepare(MODELS["mobilenet_v2"][0](), calib[0], q, qat=qat)
    with torch.no_grad():
        prepared(*calib[0].values())
    converted = _torch.convert(prepared, fold_quantize=True)
    lowered = pair_safety.enforce(converted, q)  # what the convert stage does
    assert (lowered == 0) is (not qat)  # PTQ's observers leave nothing to lower; QAT folds BN after them
    pairing = depthwise = 0
    for node in converted.graph.nodes:
        if node.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            continue
        dq = node.args[1]
        w = getattr(converted, dq.args[0].target).numpy()
        scale = getattr(converted, dq.args[1].target).numpy()
        assert np.abs(w.astype(int)).max() <= 127
        if node.target == torch.ops.aten.conv2d.default and w.shape[1] == 1:
            depthwise += 1
            assert np.abs(w.astype(int)).max() == 127  # full 8 bits
            continue
        pairing += 1
        assert not saturable(k_rows(w, 0, node.target == torch.ops.aten.conv2d.default)).any()
        real = w.astype(np.float64) * scale.reshape(-1, *[1] * (w.ndim - 1))
        seven_bit = np.abs(real).reshape(len(w), -1).max(1) / 63
        assert (scale <= seven_bit * (1 + 1e-6)).all()
    assert pairing >= 10 and depthwise >= 4


# ------------------------------------------------------------------ exclusions and overrides
def test_exclude_names_keeps_matching_modules_float(tmp_path):
    calib, test = model_data("resnet", batches=1, batch=4)
    result = quantize(MODELS["resnet"][0](), calib, test, tmp_path, section(exclude_names=["layer2.*"]))
    convs = [n for n in result.converted.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(convs) == 10
    for conv in convs:
        scope = list(conv.meta["nn_module_stack"].values())[-1][0]
        quantized = conv.args[1].op == "call_function"  # a dequantize of int8 weights, else the fp32 get_attr
        assert quantized is not scope.startswith("layer2."), scope
    assert result.report["integer_ops"] == {"QLinearConv": 5, "QGemm": 1}
    assert sum(result.report["float_ops"].values()) == 5  # layer2's four 3x3 convs and its 1x1 downsample


def test_exclude_types_uses_module_classes():
    calib, _ = model_data("bert", batches=1)
    prepared = prepare(MODELS["bert"][0](), calib[0], section(exclude_types=["SelfAttention"]))
    linears = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.linear.default]
    for node in linears:
        types = [t for _, t in node.meta["nn_module_stack"].values()]
        in_attention = any(str(t).endswith("SelfAttention") for t in types)
        assert (node.args[1].op == "call_module") is not in_attention
    assert not [
        n for n in prepared.graph.nodes if n.target == torch.ops.aten.matmul.default and n.args[0].op == "call_module"
    ]


def test_overrides_merge_field_by_field_the_last_setting_a_field_wins():
    from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver

    calib, _ = model_data("mlp", batches=1)
    q = section(
        reduce_range=False,
        overrides=[
            {"names": ["fc*"], "reduce_range": True},
            {
                "names": ["fc2"],
                "reduce_range": False,
                "weights": {"granularity": "per_tensor"},
                "activations": {"dtype": "int8", "symmetric": True},
            },
            {"names": ["fc3"], "exclude": True},
            {"names": ["fc1", "fc2", "fc3"], "observer": "minmax"},  # appended: changes the observer only
        ],
    )
    prepared = prepare(MODELS["mlp"][0](), calib[0], q)
    fc = {
        n.meta["nn_module_stack"][next(reversed(n.meta["nn_module_stack"]))][0]: n
        for n in prepared.graph.nodes
        if n.target == torch.ops.aten.linear.default
    }
    w1 = prepared.get_submodule(fc["fc1"].args[1].target)
    w2 = prepared.get_submodule(fc["fc2"].args[1].target)
    x2 = prepared.get_submodule(fc["fc2"].args[0].target)
    assert type(w1) is PerChannelMinMaxObserver and w1.quant_max == 63
    assert type(w2) is MinMaxObserver and w2.quant_max == 127 and w2.qscheme == torch.per_tensor_symmetric
    assert x2.dtype == torch.int8 and x2.qscheme == torch.per_tensor_symmetric and type(x2) is MinMaxObserver
    assert fc["fc3"].args[0].op != "call_module" and fc["fc3"].args[1].op == "get_attr"


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("exclude_names", ["layer3.*"], "quantization.exclude_names[0] 'layer3.*'"),
        ("exclude_types", ["Linear", "Conv2D"], "quantization.exclude_types[1] 'Conv2D' (did you mean 'Conv2d'?)"),
        (
            "overrides",
            [{"names": ["fc", "stemm"]}],
            "quantization.overrides[0].names[1] 'stemm' (did you mean 'stem'?)",
        ),
    ],
)
def test_a_glob_matching_nothing_is_an_error(key, value, message):
    calib, _ = model_data("resnet", batches=1, batch=2)
    with pytest.raises(RecipeError) as err:
        prepare(MODELS["resnet"][0](), calib[0], section(**{key: value}))
    assert err.value.message.startswith(f"matches no module of the model: {message}")
    assert err.value.message.count("quantization.") == 1


# ------------------------------------------------------------------ observers and state round trips
def test_percentile_observer_clips_outliers():
    from torchao.quantization.pt2e.observer import MinMaxObserver

    from quantcli.quantizers.observers import PercentileObserver

    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    x[7] = 1000.0
    pct, mm = PercentileObserver(dtype=torch.uint8), MinMaxObserver(dtype=torch.uint8)
    pct(x), mm(x)
    scale, _ = pct.calculate_qparams()
    assert float(scale) < float(mm.calculate_qparams()[0]) / 50
    assert 4.0 / 255 < float(scale) < 12.0 / 255  # about (3.9 + 3.9) / 255, not 1004 / 255


@pytest.mark.parametrize("observer", ["percentile", "histogram"])
def test_observer_state_survives_a_fresh_prepare(observer):
    calib, test = model_data("bert", batches=2, batch=8)
    q = section(observer=observer)
    model = MODELS["bert"][0]()
    first = prepare(model, calib[0], q)
    with torch.no_grad():
        for batch in calib:
            first(*batch.values())
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = prepare(MODELS["bert"][0](), calib[0], q)  # a new capture, as in another process
    second.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    a, b = _torch.convert(first, True), _torch.convert(second, True)
    with torch.no_grad():
        assert torch.equal(a(*test.values()), b(*test.values()))


# ------------------------------------------------------------------ scaled_dot_product_attention
SDPA = torch.ops.aten.scaled_dot_product_attention.default


@pytest.mark.parametrize("name", ["vit", "hf_bert"])
def test_sdpa_written_out_equals_it_in_fp32(name):
    from quantcli.quantizers.attention import decompose_sdpa

    calib, test = model_data(name, batches=1, batch=4)
    module = capture(MODELS[name][0](), calib[0])[0].module()
    with torch.no_grad():
        before = leaves(module(*test.values()))
        assert decompose_sdpa(module, lambda node: True) == 2
        after = leaves(module(*test.values()))
    assert not [n for n in module.graph.nodes if n.target == SDPA]
    assert max(float(np.abs(a - b).max()) for a, b in zip(before, after)) < 1e-5


class _Attention(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask):
        kw = dict(self.kw)
        if kw.pop("masked", False):
            kw["attn_mask"] = mask > 0 if kw.pop("bool_mask", False) else mask
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize(
    "kw,written",
    [
        ({"is_causal": True}, True),
        ({"masked": True, "scale": 0.3}, True),
        ({"masked": True, "bool_mask": True}, True),
        ({"dropout_p": 0.1}, False),
    ],
)
def test_sdpa_forms(kw, written):
    from quantcli.quantizers.attention import decompose_sdpa

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 4, 7, 8, generator=g) for _ in range(3)] + [torch.randn(2, 1, 7, 7, generator=g)]
    module = torch.export.export(_Attention(**kw), tuple(args)).module()
    expected = module(*args)
    assert decompose_sdpa(module, lambda node: True) == int(written)
    if written:
        assert torch.allclose(module(*args), expected, atol=1e-5)
        # the scale multiplies the query (7 x 8 a head), which the export turns into a change of its
        # quantization scale, and not the scores (7 x 7), which would stay a float Mul in ONNX
        muls = [n.meta["val"].shape for n in module.graph.nodes if n.target == torch.ops.aten.mul.Tensor]
        assert muls == [(2, 4, 7, 8)]
        # a bool mask becomes an additive one of its own shape, not a masked_fill of every head's scores
        masking = [n for n in module.graph.nodes if "where" in str(n.target) or "fill" in str(n.target)]
        wheres = [n.meta["val"].shape for n in masking]
        expected = [(2, 1, 7, 7)] if kw.get("bool_mask") else [(7, 7)] if kw.get("is_causal") else []
        assert wheres == expected


def test_baddbmm_is_written_out_as_a_bmm_the_quantizer_annotates():
    """BLOOM's scores, alibi.baddbmm(q, k, beta=1, alpha=1/sqrt(d)), ran as a float FusedMatMul in ORT (11 of 13
    matmuls integer in the sweep, 13 of 13 written out). beta 0 ignores its input, NaN included: left as it is."""
    from quantcli.quantizers import rewrites

    class Scores(torch.nn.Module):
        def __init__(self, beta: float):
            super().__init__()
            self.beta = beta

        def forward(self, b, x, y):
            return b.baddbmm(x, y, beta=self.beta, alpha=0.25)

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(4, 1, 8, generator=g), torch.randn(4, 8, 16, generator=g), torch.randn(4, 16, 8, generator=g))
    for beta, written in ((1.0, True), (0.5, True), (0.0, False)):
        module = torch.export.export(Scores(beta), args).module()
        expected = module(*args)
        assert rewrites.decompose_baddbmm(module, lambda node: True) == int(written)
        assert torch.allclose(module(*args), expected, atol=1e-5)
        targets = {n.target for n in module.graph.nodes if n.op == "call_function"}
        assert (torch.ops.aten.bmm.default in targets) == written != (torch.ops.aten.baddbmm.default in targets)


def test_sdpa_matmuls_are_quantized_except_where_excluded():
    calib, test = model_data("vit", batches=1, batch=4)
    prepared = prepare(MODELS["vit"][0](), calib[0], section())
    matmuls = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.matmul.default]
    assert len(matmuls) == 4 and all(a.op == "call_module" for n in matmuls for a in n.args[:2])
    kept = prepare(MODELS["vit"][0](), calib[0], section(exclude_types=["SelfAttention"]))
    assert len([n for n in kept.graph.nodes if n.target == SDPA]) == 2
    assert not [n for n in kept.graph.nodes if n.target == torch.ops.aten.matmul.default]
    # a fresh prepare (another process) builds the same graph, for QAT too
    for qat in (False, True):
        first = prepare(MODELS["vit"][0](), calib[0], section(), qat=qat)
        second = prepare(MODELS["vit"][0](), calib[0], section(), qat=qat)
        second.load_state_dict(first.state_dict(), strict=True)
        assert [n.name for n in first.graph.nodes] == [n.name for n in second.graph.nodes]
        assert not [n for n in first.graph.nodes if n.target == SDPA]


# ------------------------------------------------------------------ QAT
@pytest.mark.slow
def test_qat_uses_plain_fake_quantize_and_matches_convert():
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver

    from quantcli.quantizers.observers import PairSafePerChannelObserver

    calib, test = model_data("two_io", batches=3, batch=8)
    model = MODELS["two_io"][0]().train()
    prepared = prepare(model, calib[0], section(), qat=True)
    fqs = [m for m in prepared.modules() if isinstance(m, _torch.FakeQuantizeBase)]
    assert fqs and all(type(m) is FakeQuantize for m in fqs)
    observers = {type(m.activation_post_process) for m in fqs}
    assert observers == {MovingAverageMinMaxObserver, PairSafePerChannelObserver}  # TARGET's weights: pair-safe
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for batch in calib:
        loss = prepared(*batch.values())["logits"].pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _torch.to_eval(prepared)
    _torch.disable_observers(prepared)
    with torch.no_grad():
        trained = leaves(prepared(*test.values()))
        converted = _torch.convert(prepared, True)
        result = leaves(converted(*test.values()))
    assert min(sqnr_db(t, r) for t, r in zip(trained, result)) > 60
    assert not [n for n in converted.graph.nodes if "batch_norm" in str(n.target)]


def test_x86_inductor_target_prepares_with_its_defaults():
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

    calib, test = model_data("resnet", batches=1, batch=4)
    quantizer = quantizers.build(section(target="x86_inductor"), qat=False)
    assert isinstance(quantizer, X86InductorQuantizer)
    program, _ = capture(MODELS["resnet"][0](), calib[0])
    prepared = _torch.prepare(program.module(), quantizer, False)
    assert observed_nodes(prepared)


# ------------------------------------------------------------------ transformers with outliers
def _task(n: int, g: torch.Generator):
    """Is the majority of the (unpadded) tokens below VOCAB/2? Padding masks vary per row."""
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    ids = ids * mask
    low = ((ids < VOCAB // 2) & (mask > 0)).sum(1)
    return ids, mask, (low * 2 > lengths).long()


@pytest.fixture(scope="module")
def trained_bert():
    """A tiny BERT classifier trained for a few seconds (reaches ~90% accuracy)."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyBert(dim=32, heads=2, ffn=128, num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(150):
            ids, mask, y = _task(64, g)
            loss = torch.nn.functional.cross_entropy(model(ids, mask), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    ids, mask, y = _task(512, g)
    with torch.no_grad():
        accuracy = (model(ids, mask).argmax(1) == y).float().mean().item()
    assert accuracy > 0.8
    model.classifier = None  # the pooled output is what is compared
    return model


def with_outlier_channels(model: TinyBert, alpha: float = 30.0) -> TinyBert:
    """Give two FFN channels per layer the large activations trained BERTs show at the GELU output.

    fc1's row (weight and bias) grows by alpha and fc2's column shrinks by alpha: the channels
    then reach ~50-100 while the others stay below ~3; the fp32 reference is this model.
    """
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.layers:
            for j in (3, 17):
                layer.intermediate.weight[j] *= alpha
                layer.intermediate.bias[j] = layer.intermediate.bias[j] * alpha + alpha
                layer.output.weight[:, j] /= alpha
    return model


def _cosines(model, q: QuantizationSection, folder: Path, to_onnx: bool = True):
    g = torch.Generator().manual_seed(1)
    calib = [dict(zip(("input_ids", "attention_mask"), _task(32, g)[:2])) for _ in range(8)]
    test = dict(zip(("input_ids", "attention_mask"), _task(256, g)[:2]))
    result = quantize(model, calib, test, folder, q, to_onnx)
    fp = torch.from_numpy(result.fp[0])
    cos_torch = torch.nn.functional.cosine_similarity(fp, torch.from_numpy(result.int8[0]), dim=-1)
    print("cosine torch mean/min", cos_torch.mean().item(), cos_torch.min().item())
    if not to_onnx:
        return cos_torch, None, result
    cos_ort = torch.nn.functional.cosine_similarity(fp, torch.from_numpy(result.ort[0]), dim=-1)
    print("cosine ORT mean/min", cos_ort.mean().item(), cos_ort.min().item())
    return cos_torch, cos_ort, result


@pytest.mark.slow
def test_trained_transformer_default_config_stays_near_fp32(trained_bert, tmp_path):
    cos_torch, cos_ort, result = _cosines(trained_bert, section(), tmp_path)
    assert cos_torch.min() >= 0.99 and cos_ort.min() >= 0.99  # measured mean 0.9999, min 0.999
    assert result.report["float"] == 0


@pytest.mark.slow
def test_equalization_handles_ffn_outlier_channels(trained_bert, tmp_path):
    model = with_outlier_channels(trained_bert)
    cos_torch, cos_ort, result = _cosines(model, section(), tmp_path)
    assert cos_torch.min() >= 0.99 and cos_ort.min() >= 0.99  # measured min 0.998 (mean 0.9999)
    assert result.report["float"] == 0 and result.report["integer"] == 17
    smooth = [name for name, _ in result.prepared.named_buffers() if name.startswith("_quantcli_smooth_")]
    assert len(smooth) == 2
    plain, _, _ = _cosines(model, section(equalize=False), tmp_path, to_onnx=False)
    assert plain.min() < 0.98  # measured min 0.959, mean 0.9957: per-tensor uint8 of the GELU output


def test_equalization_scales_only_outlier_channels():
    from quantcli.quantizers.equalize import channel_scales

    g = torch.Generator().manual_seed(0)
    gamma, beta = torch.ones(32), torch.zeros(32)
    w1, b1 = torch.randn(128, 32, generator=g) * 0.2, torch.zeros(128)
    assert channel_scales(gamma, beta, w1, b1, 128) is None  # nothing stands out: graph untouched
    w1[5] *= 40
    scales = channel_scales(gamma, beta, w1, b1, 128)
    assert scales[5] > 4 and torch.equal(torch.cat([scales[:5], scales[6:]]), torch.ones(127))


def test_equalized_model_reprepares_identically(trained_bert):
    model = with_outlier_channels(trained_bert)
    g = torch.Generator().manual_seed(1)
    batch = dict(zip(("input_ids", "attention_mask"), _task(8, g)[:2]))
    first = prepare(model, batch, section())
    with torch.no_grad():
        first(*batch.values())
    second = prepare(model, batch, section())
    second.load_state_dict(first.state_dict(), strict=True)
    smooth = first.get_buffer("_quantcli_smooth_0")
    assert torch.equal(smooth, second.get_buffer("_quantcli_smooth_0"))
    assert torch.equal(smooth.half().float(), smooth)  # float16 holds it: the file stores it in 2 bytes
    # the rewrite works on a copy: the captured program's weights stay those of the fp32 model
    fc2 = model.layers[0].output.weight
    assert not torch.equal(second.get_parameter("layers.0.output.weight"), fc2)
    with torch.no_grad():
        assert torch.allclose(first(*batch.values()), second(*batch.values()))
