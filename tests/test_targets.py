"""Evaluation targets: their form is checked from the header and where they are counted; a metric
value outside its range is a defect, never a report."""

from __future__ import annotations

import json

import numpy as np
import yaml

from quantcli.numerics import metrics
from tests.conftest import DIGITS, assert_fails, cli


def digits_with_targets(tmp_path, shared_recipe, targets) -> tuple:
    """The shared digits recipe reading its evaluation targets from a copy of digits.npz with `targets` instead."""
    arrays = dict(np.load(DIGITS / "digits.npz"))
    arrays["test_y"] = targets(arrays["test_y"])
    np.savez(tmp_path / "digits.npz", **arrays)
    recipe = yaml.safe_load(shared_recipe.read_text())
    recipe["evaluation"]["data"] = str(tmp_path / "digits.npz")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, arrays["test_y"]


def test_a_column_of_targets_gives_the_true_accuracy_with_one_note(work, shared_recipe, tmp_path):
    recipe, column = digits_with_targets(tmp_path, shared_recipe, lambda y: y.reshape(-1, 1))
    assert column.shape == (400, 1)
    assert cli("validate", recipe).rc == 0
    run = cli("export", work / "converted", "-o", tmp_path / "model.onnx", "--recipe", recipe)
    assert run.rc == 0, run.stderr
    note = "evaluation.targets: a column of shape [N, 1] is read as [N], one class index per sample"
    assert run.stderr.count(note) == 1, run.stderr
    got = json.loads((tmp_path / "model.report.json").read_text())["evaluation"]
    want = json.loads((work / "model.report.json").read_text())["evaluation"]
    assert 0.5 < want["fp32_torch"] <= 1  # the digits CNN is trained: a real accuracy to compare with
    assert {k: got[k] for k in ("fp32_torch", "fp32_onnx", "int8_onnx")} == {
        k: want[k] for k in ("fp32_torch", "fp32_onnx", "int8_onnx")
    }


def test_one_hot_targets_are_an_input_error_in_validate_and_in_every_stage(work, shared_recipe, tmp_path):
    recipe, _ = digits_with_targets(tmp_path, shared_recipe, lambda y: np.eye(10, dtype=np.int64)[y])
    line = (
        "evaluation.targets has shape [400, 10]; accuracy needs one class index per sample, shape [N] "
        "(one-hot or scores? store their argmax)"
    )
    assert_fails(cli("validate", recipe), 3, line)
    assert_fails(cli("export", work / "converted", "-o", tmp_path / "model.onnx", "--recipe", recipe), 3, line)
    assert not (tmp_path / "model.onnx").exists()


def test_float_targets_are_an_input_error(work, shared_recipe, tmp_path):
    recipe, _ = digits_with_targets(tmp_path, shared_recipe, lambda y: y.astype(np.float32))
    assert_fails(cli("validate", recipe), 3, "evaluation.targets is float32; accuracy needs integer class indices")


def test_a_target_beyond_the_models_classes_is_an_input_error(work, shared_recipe, tmp_path):
    recipe, _ = digits_with_targets(tmp_path, shared_recipe, lambda y: np.where(np.arange(len(y)) == 7, 12, y))
    assert cli("validate", recipe).rc == 0  # the number of classes is the model's: known once it runs
    assert_fails(
        cli("export", work / "converted", "-o", tmp_path / "model.onnx", "--recipe", recipe),
        3,
        "evaluation.targets holds class 12, but the model's output has 10 classes (0 to 9)",
    )


def test_a_metric_outside_its_range_is_an_internal_error_not_a_report(work, shared_recipe, tmp_path, monkeypatch):
    real = metrics.Accuracy.figures
    monkeypatch.setattr(metrics.Accuracy, "figures", lambda self: {**real(self), "value": 7.04})
    run = cli("export", work / "converted", "-o", tmp_path / "model.onnx", "--recipe", shared_recipe)
    assert_fails(run, 1, "internal error: accuracy came out as 7.04, outside [0.0, 1.0]")
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "model.report.json").exists()
