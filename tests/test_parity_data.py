"""export's parity is measured on data the quantization ranges were not fitted to."""

from __future__ import annotations

import json

import numpy as np

from tests.conftest import DIGITS, cli, digits_recipe


def _ort_vs_fp32_db(converted, onnx_path, batch: np.ndarray) -> float:
    """ONNX Runtime's SQNR against the fp32 program on `batch`, the way export measures it."""
    import torch

    from quantcli import _torch
    from quantcli.numerics.parity import sqnr_db
    from quantcli.onnx import runtime

    with torch.no_grad():
        fp32 = _torch.load_program(converted / "float.pt2").module()(torch.from_numpy(batch)).numpy()
    return sqnr_db(fp32, runtime.run(runtime.session(onnx_path), {"x": batch})[0])


def test_parity_is_measured_on_the_evaluation_data_not_the_calibration_data(work):
    report = json.loads((work / "model.report.json").read_text())
    assert report["parity"]["data"] == "evaluation batch 0"
    arrays = np.load(DIGITS / "digits.npz")
    held_out = _ort_vs_fp32_db(work / "converted", work / "model.onnx", arrays["test_x"][:64])  # batch_size 64
    calibrated_on = _ort_vs_fp32_db(work / "converted", work / "model.onnx", arrays["calib_x"][:32])
    assert report["sqnr_vs_float_db"]["logits"] == held_out != calibrated_on


def test_without_evaluation_parity_takes_the_first_batch_calibration_did_not_read(tmp_path):
    recipe = digits_recipe(
        tmp_path,
        evaluation=None,
        calibration={"data": str(DIGITS / "digits.npz"), "keys": {"x": "calib_x"}, "batch_size": 32, "num_batches": 2},
    )
    run = cli("run", "--recipe", recipe, "-o", tmp_path / "w")
    assert run.rc == 0, run.stderr
    report = json.loads((tmp_path / "w" / "model.report.json").read_text())
    assert report["parity"]["data"] == "calibration batch 2, held out from calibration (num_batches: 2)"
    batch = np.load(DIGITS / "digits.npz")["calib_x"][64:96]
    w = tmp_path / "w"
    assert report["sqnr_vs_float_db"]["logits"] == _ort_vs_fp32_db(w / "converted", w / "model.onnx", batch)
    shown = cli("inspect", w / "model.onnx")
    assert "parity on calibration batch 2, held out from calibration (num_batches: 2): passed" in shown.stdout
