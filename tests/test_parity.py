"""The export parity check trips on an ONNX model that misbehaves in ONNX Runtime, not on a deep one.

Each planted defect is real: an edit of the exported ONNX file run in ORT (a corrupted scale, a
mis-exported op), or the u8s8 kernel's int16 saturation emulated on a real quantized layer (a
VNNI CPU cannot be made to saturate). The verdict is `quantcli.numerics.parity.verdict`, the
function export applies; the zoo tests show it passes every model of the ecosystem.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantcli import _torch, artifacts, quantizers
from quantcli.loading.inputs import example_batch
from quantcli.numerics import parity
from quantcli.onnx import runtime
from quantcli.recipe import QuantizationSection, Recipe
from quantcli.stages.export import outputs
from tests.models import MODELS
from tests.test_quantizer import _saturating_u8s8, leaves, model_data, prepare

torch = _torch.torch
DEFAULT_EXCESS = Recipe.model_fields["export"].default_factory().parity_max_excess_db


# ------------------------------------------------------------------ the function
def test_excess_is_what_ort_adds_to_the_quantization_error():
    rng = np.random.default_rng(0)
    fp32 = rng.standard_normal(10_000)
    quantization = rng.standard_normal(10_000) * 0.01
    int8 = fp32 + quantization
    assert parity.excess_db(fp32, int8, int8) == 0.0  # ORT rounds exactly like PyTorch
    # another realization of the same noise (a correct kernel rounding differently): ~0 dB
    assert abs(parity.excess_db(fp32, int8, fp32 + rng.standard_normal(10_000) * 0.01)) < 0.2
    # the int8 error plus an independent error as large: +3 dB
    assert parity.excess_db(fp32, int8, int8 + rng.standard_normal(10_000) * 0.01) == pytest.approx(3.0, abs=0.2)
    assert parity.excess_db(fp32, int8, int8 * 10) > 30
    assert parity.excess_db(fp32, int8, np.full_like(fp32, np.nan)) == 200.0
    assert parity.excess_db(fp32, fp32, fp32) == 0.0  # an output quantization does not touch


def test_verdict_takes_the_worst_output_and_the_optional_floor():
    fp32 = [np.ones((4, 3)), np.ones((4, 2))]
    int8 = [f + 0.01 for f in fp32]
    good = parity.verdict(["a", "b"], fp32, int8, int8, max_excess_db=6.0)
    assert good["passed"] and good["excess_db"] == 0.0 and good["samples"] == 4 and good["threshold_db"] is None
    assert set(good["per_output"]) == {"a", "b"}
    bad = parity.verdict(["a", "b"], fp32, int8, [int8[0], int8[1] + 0.1], max_excess_db=6.0)
    assert not bad["passed"] and bad["excess_db"] == bad["per_output"]["b"]["excess_db"] > 6
    assert "export.parity_max_excess_db 6.0" in parity.failure(bad)
    floored = parity.verdict(["a", "b"], fp32, int8, [i + 1e-4 for i in int8], max_excess_db=6.0, min_sqnr_db=200)
    assert not floored["passed"] and "export.parity_min_sqnr_db 200" in parity.failure(floored)


# ------------------------------------------------------------------ planted defects in a real ONNX file
def _digits_check(work, tmp_path, edit=None) -> dict:
    """The verdict on the shared digits chain's ONNX model, after `edit(model)` if given."""
    converted = artifacts.open_artifact(work / "converted", ("converted",), "test")
    recipe = Recipe.model_validate(converted.manifest["recipe"])
    sample = example_batch(recipe)
    fp32 = outputs(_torch.load_program(converted.file(artifacts.FLOAT_PROGRAM)), recipe, sample)
    int8 = outputs(_torch.load_program(converted.file(artifacts.PROGRAM)), recipe, sample)
    path = work / "model.onnx"
    if edit is not None:
        model = onnx.load(str(path))
        edit(model)
        path = tmp_path / "edited.onnx"
        onnx.save(model, str(path))
    ort = runtime.run(runtime.session(path), sample)
    return parity.verdict(["logits"], fp32, int8, ort, max_excess_db=DEFAULT_EXCESS)


def _scale_by(factor: float, index: int = 3):
    """Multiply the scale of the index-th activation DequantizeLinear (and only that node's) by `factor`."""

    def edit(model):
        inits = {i.name: i for i in model.graph.initializer}
        node = [
            n
            for n in model.graph.node
            if n.op_type == "DequantizeLinear"
            and n.input[1] in inits
            and numpy_helper.to_array(inits[n.input[1]]).ndim == 0
        ][index]
        scale = numpy_helper.to_array(inits[node.input[1]]) * np.float32(factor)
        model.graph.initializer.append(numpy_helper.from_array(scale, f"{node.name}_corrupted_scale"))
        node.input[1] = f"{node.name}_corrupted_scale"  # a scale Q and DQ share would stay consistent

    return edit


def _add_becomes_sub(model):
    node = next(n for n in model.graph.node if n.op_type == "Add")
    node.op_type = "Sub"


def test_the_exported_model_passes_and_a_harmless_edit_does_too(work, tmp_path):
    report = json.loads((work / "model.report.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["max_excess_db"] == DEFAULT_EXCESS
    assert _digits_check(work, tmp_path)["passed"]
    assert _digits_check(work, tmp_path, _scale_by(1 + 1e-6))["passed"]


@pytest.mark.parametrize(
    "edit",
    [_scale_by(2.0), _scale_by(0.5, index=5), _add_becomes_sub],
    ids=["scale_x2", "scale_half", "add_exported_as_sub"],
)
def test_a_planted_defect_in_the_onnx_file_fails(work, tmp_path, edit):
    check = _digits_check(work, tmp_path, edit)
    assert not check["passed"] and check["excess_db"] > DEFAULT_EXCESS, check


def test_emulated_u8s8_saturation_fails_and_7bit_weights_pass():
    """ORT's AVX2 u8s8 kernel (int16 pair sums) on the MLP's first layer, emulated on its real int8 tensors.

    fp32 and PyTorch int8 outputs are the real models'; 'ORT' is the int8 model with fc1's
    integer product replaced by the saturating one, as such a CPU would compute it.
    """
    calib, test = model_data("mlp", batches=2, batch=64)
    excess = {}
    for reduce_range in (False, True):
        q = quantizers.resolve(QuantizationSection(target_cpu="avx2", reduce_range=reduce_range))
        model = MODELS["mlp"][0]()
        prepared = prepare(model, calib[0], q)
        with torch.no_grad():
            for batch in calib:
                prepared(*batch.values())
        converted = _torch.convert(prepared, fold_quantize=True)
        with torch.no_grad():
            fp32, int8 = leaves(model(*test.values())), leaves(converted(*test.values()))
        saturated = _SaturatingFc1(converted).run(test["x"])
        check = parity.verdict(["logits"], fp32, int8, [saturated.numpy()], max_excess_db=DEFAULT_EXCESS)
        excess[reduce_range] = check["excess_db"]
        assert check["passed"] is reduce_range, check
    assert excess[True] < 0.5 < DEFAULT_EXCESS < 10 < excess[False]


class _SaturatingFc1(torch.fx.Interpreter):
    """Runs a converted module with its first linear computed by the saturating u8s8 kernel."""

    def __init__(self, converted):
        super().__init__(converted, garbage_collect_values=False)
        self.fc1 = next(n for n in converted.graph.nodes if n.target == torch.ops.aten.linear.default)

    def run_node(self, node):
        if node is not self.fc1:
            return super().run_node(node)
        dq_x, dq_w, bias = node.args[0], node.args[1], node.args[2]
        a = self.env[dq_x.args[0]].numpy().astype(np.int64)  # the uint8 input ORT multiplies
        w = getattr(self.module, dq_w.args[0].target).numpy().T.astype(np.int64)
        x_scale, x_zero = float(dq_x.args[1]), int(dq_x.args[2])
        w_scale = getattr(self.module, dq_w.args[1].target).numpy()
        acc = _saturating_u8s8(a, w) - x_zero * w.sum(0)
        out = acc * x_scale * w_scale + self.env[bias].numpy()
        assert math.isfinite(float(np.abs(out).max()))
        return torch.from_numpy(out.astype(np.float32))


def test_on_the_targets_arithmetic_the_target_decides_and_this_cpus_figures_ride_along():
    """Where this CPU saturates what the target computes exactly, the unfused run's verdict is the verdict, this
    CPU's is recorded beside it; with avx2's saturation emulated on a VNNI machine, both must pass."""
    fp32 = [np.ones((4, 3))]
    int8 = [fp32[0] + 0.01]
    exact = parity.verdict(["a"], fp32, int8, int8, max_excess_db=6.0)
    saturated = parity.verdict(["a"], fp32, int8, [int8[0] + 0.1], max_excess_db=6.0)
    unfused = parity.on_target(exact, saturated, "vnni")
    assert unfused["passed"] and unfused["unfused"] == "vnni" and not unfused["local"]["passed"]
    assert unfused["excess_db"] == exact["excess_db"] and unfused["local"]["excess_db"] > 6
    failed = parity.on_target(saturated, exact, "vnni")
    assert not failed["passed"] and parity.failure(failed).startswith("on vnni's arithmetic (unfused): ONNX Runtime's")
    assert not parity.with_local(exact, saturated, "avx2")["passed"]  # the other direction: this CPU must pass too
