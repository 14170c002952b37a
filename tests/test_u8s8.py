"""The emulation of ORT's saturating u8 x s8 kernels (quantcli.onnx.u8s8), on both kinds of x86 machine.

The same code runs everywhere: each exposed layer of the emulated model is held to an independent
integer reference (im2col in the kernel's K order, pairs clipped to int16), and the whole model to
ONNX Runtime itself where this machine's kernels saturate (x86 without VNNI), else to the exact
(unoptimized) model, which this machine's ORT then matches.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from quantcli import _torch, quantizers
from quantcli.numerics.parity import sqnr_db
from quantcli.onnx import runtime, u8s8
from quantcli.quantizers.cpu import detect_cpu, saturates_u8s8
from quantcli.recipe import QuantizationSection
from tests.conftest import assert_fails, cli, digits_recipe
from tests.test_quantizer import quantize

torch = _torch.torch
nn = torch.nn


class Net(nn.Module):
    """A grouped conv with an odd input-channel count per group (pairs cross kernel positions) and padding,
    a strided conv, a Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(6, 24, 3, padding=1, groups=2)
        self.conv2 = nn.Conv2d(24, 32, 3, stride=2, padding=1)
        with torch.no_grad():
            self.conv1.weight.abs_()  # same-sign pairs: the grouped conv saturates on most inputs
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


def _batches(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.rand(8, 6, 8, 8, generator=g) * 4} for _ in range(n)]


def _with_outputs(model, names: list[str]):
    """The model with `names` as extra graph outputs (their types left for ORT to infer)."""
    extra = onnx.ModelProto()
    extra.CopyFrom(model)
    extra.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return extra


def _run(model, feed, tmp_path, name, optimize=False):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return runtime.run(runtime.session(path, optimize=optimize), feed)


def _accumulator(layer: u8s8.Layer, a: np.ndarray, clip: bool) -> np.ndarray:
    """The int32 sum of raw uint8 input x int8 weight the kernel forms, each pair of products clipped to int16
    (clip) or not (the exact sum)."""
    lo, hi = (-32768, 32767) if clip else (None, None)
    q = layer.q.astype(np.int64)
    if not layer.conv:  # (..., K) x (N, K): pairs along K
        rows = np.moveaxis(q, layer.out_axis, 0).reshape(q.shape[layer.out_axis], -1)
        a = a.astype(np.int64).reshape(-1, rows.shape[1])
        prod = a[:, None, :] * rows[None, :, :]
        return np.clip(prod[..., 0::2] + prod[..., 1::2], lo, hi).sum(-1)
    node = layer.node
    attr = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    groups, stride, pads = attr.get("group", 1), attr.get("strides", [1, 1]), attr.get("pads", [0, 0, 0, 0])
    out, cin_g, kh, kw = q.shape
    x = np.pad(
        a.astype(np.int64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=layer.x_zero_point
    )
    oh, ow = (x.shape[2] - kh) // stride[0] + 1, (x.shape[3] - kw) // stride[1] + 1
    result = np.zeros((a.shape[0], out, oh, ow), np.int64)
    per_group = out // groups
    for o in range(out):
        g = o // per_group
        w = np.moveaxis(q[o], 0, -1).reshape(-1)  # (kh, kw, cin_g): the input channel fastest
        w = np.append(w, 0) if len(w) % 2 else w
        for i in range(oh):
            for j in range(ow):
                top, left = i * stride[0], j * stride[1]
                patch = x[:, g * cin_g : (g + 1) * cin_g, top : top + kh, left : left + kw]
                col = np.moveaxis(patch, 1, -1).reshape(a.shape[0], -1)
                col = np.concatenate([col, np.zeros((a.shape[0], 1), np.int64)], 1) if col.shape[1] % 2 else col
                prod = col * w
                result[:, o, i, j] = np.clip(prod[:, 0::2] + prod[:, 1::2], lo, hi).sum(1)
    return result


def test_emulation_matches_the_saturating_kernel_and_this_machines_ort(tmp_path):
    q = quantizers.resolve(QuantizationSection(target_cpu="avx2", reduce_range=False))  # 8-bit: saturates
    calib, test = _batches(4, 0), _batches(1, 100)[0]
    quantize(Net().eval(), calib, test, tmp_path, q)
    model = onnx.load(str(tmp_path / "model.onnx"))
    emulated, counts = u8s8.emulate(model)
    layers = u8s8.exposed_layers(model)
    assert [layer.node.op_type for layer in layers] == ["Conv", "Conv", "Gemm"] and all(counts.values()), counts
    feed = {"x": test["x"].numpy()}

    # each layer: the emulated output equals the integer reference on the layer's real uint8 input
    names = [layer.node.output[0] for layer in layers]
    taps = [layer.x_q for layer in layers] + [f"{n}_without_saturation" for n in names] + names
    tapped = _run(_with_outputs(emulated, taps), feed, tmp_path, "emulated")
    inputs, exact, got = tapped[1:4], tapped[4:7], tapped[7:10]
    clipped = []
    for layer, a, unsaturated, out in zip(layers, inputs, exact, got):
        assert a.dtype == np.uint8
        shape = (1, -1, 1, 1) if layer.conv else (-1,)
        lost = _accumulator(layer, a, clip=False) - _accumulator(layer, a, clip=True)
        clipped.append(int(np.count_nonzero(lost)))
        reference = unsaturated - lost * (layer.x_scale * layer.w_scale).reshape(shape)  # less what the clips lose
        assert sqnr_db(reference, out) > 80, layer.name  # float rounding only
    assert clipped[0] > 0 and clipped[2] > 0, clipped  # the saturation is really there
    exact_out = _run(model, feed, tmp_path, "exact")
    emulated_out = tapped

    # the whole model: ORT where this CPU saturates, else the exact model this CPU's ORT matches
    local = _run(model, feed, tmp_path, "local", optimize=True)[0]
    saturates_here = saturates_u8s8(detect_cpu())
    expected = emulated_out[0] if saturates_here else exact_out[0]
    assert sqnr_db(expected, local) > 35
    assert sqnr_db(exact_out[0], emulated_out[0]) < sqnr_db(expected, local) - 10


@pytest.mark.parametrize("reduce_range", ["pair_safe", True])
def test_pair_safe_and_7_bit_models_have_nothing_to_emulate(tmp_path, reduce_range):
    q = quantizers.resolve(QuantizationSection(target_cpu="avx2", reduce_range=reduce_range))
    quantize(Net().eval(), _batches(2, 0), _batches(1, 100)[0], tmp_path, q)
    model = onnx.load(str(tmp_path / "model.onnx"))
    counts = u8s8.saturable_pairs(model)
    assert len(counts) == 3 and not any(counts.values()), counts
    emulated, _ = u8s8.emulate(model)
    assert len(emulated.graph.node) == len(model.graph.node)


# ------------------------------------------------------------------ the CLI: prepare's note, export's check
@pytest.mark.parametrize("reduce_range", ["auto", False])
def test_a_model_for_avx2_is_checked_on_avx2s_arithmetic_wherever_export_runs(tmp_path, reduce_range):
    """auto builds pair-safe weights: 0 saturable pairs, parity passes; 8-bit weights forced for avx2 fail
    export's parity with exit 5, on a VNNI machine through the emulation, on an AVX2 one by its own ORT."""
    recipe = digits_recipe(tmp_path, quantization={"target_cpu": "avx2", "reduce_range": reduce_range})
    run = cli("run", "--recipe", recipe, "-o", tmp_path / "w")
    report = json.loads((tmp_path / "w" / "model.report.json").read_text())
    u8s8_section = report["u8s8"]
    assert u8s8_section["target_cpu"] == "avx2" and u8s8_section["target_saturates"] is True
    assert u8s8_section["parity_arithmetic"] == ("this cpu" if saturates_u8s8(detect_cpu()) else "emulated")
    assert len(u8s8_section["layers"]) == 7  # the digits net's 6 convs and its Linear, none depthwise
    inspected = cli("inspect", tmp_path / "w" / "model.onnx").stdout
    assert "saturable weight pairs" in inspected and "target: target_cpu avx2: " in inspected
    if reduce_range == "auto":
        assert run.rc == 0, run.stderr
        assert (
            "prepared: wrote " in run.stderr
            and "(target_cpu avx2: 8-bit weights, narrowed per output channel" in run.stderr
        )
        assert u8s8_section["saturable_pairs"] == 0 and report["parity"]["passed"]
    else:
        assert_fails(run, 5, "parity failed: ")
        assert "WRONG on avx2" in json.loads((tmp_path / "w" / "prepared" / "manifest.json").read_text())["target"]
        assert u8s8_section["saturable_pairs"] > 100 and not report["parity"]["passed"]
        if u8s8_section["parity_arithmetic"] == "emulated":
            assert "with avx2's int16 pair saturation emulated" in run.stderr
            assert report["parity"]["local"]["passed"]  # this CPU's own ORT cannot see it


def test_a_model_for_vnni_built_where_the_kernels_saturate_is_judged_on_vnnis_arithmetic(tmp_path, monkeypatch, caplog):
    """8-bit weights for vnni, exported on a CPU whose u8 x s8 kernels saturate them (this one, on an AVX2 machine;
    on a VNNI machine detect_cpu is made to say avx2): parity and the evaluation run the model unfused, the
    products a VNNI CPU computes, and pass; this CPU's own ORT is recorded beside, not judged (where it really
    saturates, it would fail); a warning says so."""
    from quantcli import pipeline
    from quantcli.quantizers import cpu

    saturates_here = saturates_u8s8(detect_cpu())
    monkeypatch.setattr(cpu, "detect_cpu", lambda *args: "avx2")
    recipe = digits_recipe(tmp_path, quantization={"target_cpu": "vnni"})
    pipeline.run(recipe, tmp_path / "w")
    report = json.loads((tmp_path / "w" / "model.report.json").read_text())
    section, check = report["u8s8"], report["parity"]
    assert section["this_cpu"] == "avx2" and section["target_saturates"] is False
    assert section["parity_arithmetic"] == "unfused" and section["saturable_pairs"] > 100
    assert check["passed"] and check["unfused"] == "vnni" and check["excess_db"] < 1
    assert check["local"]["passed"] is not saturates_here  # this CPU's saturated outputs: recorded, not judged
    evaluation = report["evaluation"]
    assert evaluation["int8_arithmetic"] == "unfused" and evaluation["int8_onnx"] >= evaluation["fp32_torch"] - 0.01
    assert any("saturate" in r.getMessage() and "ran it unfused" in r.getMessage() for r in caplog.records)
    assert "parity on vnni's arithmetic, unfused" in cli("inspect", tmp_path / "w" / "model.onnx").stdout
    # tune's judge scores the model as export did: 43 dB against fp32 unfused, about 12 where this CPU saturates
    from quantcli.recipe import load
    from quantcli.tune.goal import Goal, Judge

    program = _torch.load_program(tmp_path / "w" / "converted" / "float.pt2")
    judged = Judge(load(recipe), program, Goal(min_sqnr_db=30.0)).measure(tmp_path / "w" / "model.onnx")
    assert judged["sqnr_db"] > 35, judged
