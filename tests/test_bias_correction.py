"""Empirical bias correction after calibration (quantcli.quantizers.bias_correction, stages.calibrate)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from quantcli import _torch, artifacts
from quantcli.quantizers import bias_correction
from quantcli.stages.base import restore_prepared
from tests.conftest import DIGITS, cli, digits_recipe
from tests.models import MODELS
from tests.test_quantizer import leaves, model_data, prepare, section, sqnr_db

torch = _torch.torch


def _converted_sqnr(prepared, reference: list[np.ndarray], args: tuple) -> float:
    converted = _torch.convert(copy.deepcopy(prepared), fold_quantize=True)
    with torch.no_grad():
        return min(sqnr_db(r, o) for r, o in zip(reference, leaves(converted(*args))))


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet"])
def test_corrected_biases_bring_the_converted_model_closer_to_fp32_on_data_calibration_did_not_see(name):
    calib, held = model_data(name)
    model = MODELS[name][0]().eval()
    args = tuple(held.values())
    with torch.no_grad():
        reference = leaves(model(*args))
    prepared = prepare(model, calib[0], section())
    with torch.no_grad():
        for batch in calib:
            prepared(*batch.values())
    plain = _converted_sqnr(prepared, reference, args)
    corrected = bias_correction.correct(prepared, tuple(calib[0].values()))
    assert len(corrected) >= 3 and all(name.endswith("bias") for name in corrected)
    assert _converted_sqnr(prepared, reference, args) > plain + 0.2


class _ConvMeans(torch.fx.Interpreter):
    """Each conv's output mean per channel, by node name."""

    def run_node(self, n):
        value = super().run_node(n)
        if n.op == "call_function" and n.target is torch.ops.aten.conv2d.default:
            self.means[n.name] = value.double().mean([0, 2, 3])
        return value


def _conv_means(module, args: tuple, make) -> dict:
    interpreter = _ConvMeans(module)
    interpreter.means = {}
    with torch.no_grad(), bias_correction.observers_replaced(module, make):
        interpreter.run(*args)
    return interpreter.means


def test_each_corrected_layer_has_its_float_mean_on_the_batch_it_was_corrected_on():
    """Layer by layer in graph order: each conv's fake-quantized output mean, per channel, is its float one."""
    calib, _ = model_data("mobilenet_v2")
    prepared = prepare(MODELS["mobilenet_v2"][0](), calib[0], section())
    with torch.no_grad():
        for batch in calib:
            prepared(*batch.values())
    args = tuple(calib[0].values())
    float_means = _conv_means(prepared, args, lambda obs: torch.nn.Identity())
    faked = _conv_means(prepared, args, bias_correction.fake_quant)
    assert max(float((faked[k] - v).abs().max() / v.abs().max()) for k, v in float_means.items()) > 1e-3
    assert len(bias_correction.correct(prepared, args)) >= len(float_means)
    faked = _conv_means(prepared, args, bias_correction.fake_quant)
    assert max(float((faked[k] - v).abs().max() / v.abs().max()) for k, v in float_means.items()) < 1e-4


def test_the_reports_float_reference_keeps_the_captured_biases(work):
    converted = artifacts.open_artifact(work / "converted", ("converted",), "test")
    corrected = converted.manifest["bias_correction"]["biases"]
    assert "fc.bias" in corrected and len(corrected) == 7
    assert converted.manifest["bias_correction"]["samples"] == 32  # the first batch (batch_size 32)
    x = torch.from_numpy(np.load(DIGITS / "digits.npz")["test_x"][:64])
    captured = _torch.load_program(converted.file(artifacts.FLOAT_PROGRAM)).module()
    with torch.no_grad():
        want = captured(x)
        for float_biases, same in ((True, True), (False, False)):
            module = restore_prepared(converted, artifacts.FLOAT_PROGRAM, float_biases=float_biases)
            with bias_correction.observers_replaced(module, lambda obs: torch.nn.Identity()):
                got = module(x)
            assert torch.allclose(got, want, atol=1e-5) is same


def test_bias_correction_false_calibrates_without_it(copy_work, tmp_path):
    w = copy_work("prepared", "calibrated")
    recipe = digits_recipe(
        tmp_path / "r",
        calibration={"data": str(DIGITS / "digits.npz"), "keys": {"x": "calib_x"}, "bias_correction": False},
    )
    run = cli("calibrate", w / "prepared", "-o", w / "plain", "--recipe", recipe, "--json")
    assert run.rc == 0, run.stderr
    assert "bias_correction" not in run.json()["manifest"]
    plain = _torch.load_state(w / "plain" / artifacts.STATE)
    corrected = _torch.load_state(w / "calibrated" / artifacts.STATE)
    names = json.loads((w / "calibrated" / artifacts.MANIFEST).read_text())["bias_correction"]["biases"]
    assert all(not torch.equal(plain[n], corrected[n]) for n in names)
    # the rest alike, but the range rule `observer: auto` chose (with other biases it may choose otherwise)
    assert all(torch.equal(plain[k], v) for k, v in corrected.items() if k not in names and "searched" not in k)


class _Shared(torch.nn.Module):
    """A linear and a conv each called twice (their bias serves two outputs), and a linear called once."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, y):
        return self.b(torch.relu(self.a(torch.relu(self.a(x))))), self.c(torch.relu(self.c(y)))


def test_a_bias_two_layers_read_is_left_as_it_is():
    torch.manual_seed(0)
    batch = {"x": torch.randn(16, 8), "y": torch.randn(16, 3, 8, 8)}
    prepared = prepare(_Shared().eval(), batch, section())
    with torch.no_grad():
        prepared(*batch.values())
    before = {k: v.clone() for k, v in prepared.state_dict().items() if k.endswith("bias")}
    assert bias_correction.correct(prepared, tuple(batch.values())) == ["b.bias"]
    after = prepared.state_dict()
    assert torch.equal(after["a.bias"], before["a.bias"]) and torch.equal(after["c.bias"], before["c.bias"])
    assert not torch.equal(after["b.bias"], before["b.bias"])


class _Tokens(torch.nn.Module):
    """A linear on tokens (B, T, K), which prepare runs on its rows, then a classifier's head on the mean token."""

    def __init__(self):
        super().__init__()
        self.mix, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.mix(x)).mean(1))


def test_a_linear_on_the_rows_of_tokens_keeps_its_bias_and_a_classifier_head_is_corrected():
    """A token linear's correction bought no accuracy on the sweep's transformers and cost file size."""
    torch.manual_seed(0)
    batch = {"x": torch.randn(16, 5, 8)}
    prepared = prepare(_Tokens().eval(), batch, section())
    rows = [n for n in prepared.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert [n.meta["val"].dim() for n in rows] == [2, 2]  # the token linear runs on rows
    with torch.no_grad():
        prepared(*batch.values())
    before = prepared.state_dict()["mix.bias"].clone()
    assert bias_correction.correct(prepared, tuple(batch.values())) == ["head.bias"]
    assert torch.equal(prepared.state_dict()["mix.bias"], before)


class _TokensAndRows(torch.nn.Module):
    """One linear called on tokens and on a 2-D tensor: its bias serves both calls."""

    def __init__(self):
        super().__init__()
        self.mix, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x, y):
        return self.head(torch.relu(self.mix(x)).mean(1) + torch.relu(self.mix(y)))


def test_a_bias_a_token_linear_shares_with_another_call_is_left_as_it_is():
    torch.manual_seed(0)
    batch = {"x": torch.randn(16, 5, 8), "y": torch.randn(16, 8)}
    prepared = prepare(_TokensAndRows().eval(), batch, section())
    with torch.no_grad():
        prepared(*batch.values())
    before = prepared.state_dict()["mix.bias"].clone()
    assert bias_correction.correct(prepared, tuple(batch.values())) == ["head.bias"]
    assert torch.equal(prepared.state_dict()["mix.bias"], before)


@pytest.mark.parametrize(("dtype", "qmin", "qmax"), [(torch.uint8, 0, 255), (torch.int8, -128, 127)])
def test_per_tensor_fake_quantization_is_the_converted_programs_arithmetic_and_torchs_kernel_bit_for_bit(
    dtype, qmin, qmax
):
    from torchao.quantization.pt2e.observer import MinMaxObserver

    ops = torch.ops.quantized_decomposed
    generator = torch.Generator().manual_seed(0)
    for trial in range(40):
        x = torch.randn(4, 8, 33, 17, generator=generator) * 10 ** (trial % 5 - 2)
        obs = MinMaxObserver(dtype=dtype, quant_min=qmin, quant_max=qmax)
        obs(x[:2] * 0.8)  # the rest of the batch reaches past the range: clamped
        scale, zero_point = (float(v) for v in obs.calculate_qparams())
        x.view(-1)[::7] = (torch.arange(x.numel())[::7] % 300 - 150 + 0.5) * scale  # halfway between two codes
        faked = bias_correction.fake_quant(obs)(x)
        assert faked.dtype == x.dtype
        assert torch.equal(faked, torch.fake_quantize_per_tensor_affine(x, scale, int(zero_point), qmin, qmax))
        q = ops.quantize_per_tensor(x, scale, int(zero_point), qmin, qmax, dtype)
        assert torch.equal(faked, ops.dequantize_per_tensor(q, scale, int(zero_point), qmin, qmax, dtype))
