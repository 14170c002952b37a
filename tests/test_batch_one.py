"""A first batch of one sample must not fix the batch axis: capture sees two."""

from __future__ import annotations

import onnx

from tests.conftest import DIGITS, cli, digits_recipe


def calibration(batch_size: int, batches: int) -> dict:
    return {
        "data": str(DIGITS / "digits.npz"),
        "keys": {"x": "calib_x"},
        "batch_size": batch_size,
        "num_batches": batches,
    }


def test_batch_size_one_keeps_the_batch_axis_dynamic_from_capture_to_export(tmp_path):
    recipe = digits_recipe(tmp_path, calibration=calibration(1, 3))
    w = tmp_path / "w"
    for args in (
        ["capture", "--recipe", recipe, "-o", w / "captured"],
        ["prepare", w / "captured", "-o", w / "prepared"],
        ["calibrate", w / "prepared", "-o", w / "calibrated"],
    ):
        run = cli(*args)
        assert run.rc == 0, run.stderr
    assert "calibrated: wrote" in run.stderr and "(3 batches, 3 samples)" in run.stderr
    # the same captured program takes calibration batches of other sizes, a partial last one included
    other = digits_recipe(tmp_path, "other.yaml", calibration=calibration(7, 3))
    run = cli("calibrate", w / "prepared", "-o", w / "calibrated7", "--recipe", other)
    assert run.rc == 0 and "(3 batches, 21 samples)" in run.stderr, run.stderr
    assert cli("convert", w / "calibrated7", "-o", w / "converted").rc == 0
    run = cli("export", w / "converted", "-o", w / "model.onnx", "--json")  # evaluates 400 samples in batches of 32
    assert run.rc == 0, run.stderr
    assert run.json()["report"]["evaluation"]["samples"] == 400
    batch_axis = onnx.load(str(w / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.dim_value
