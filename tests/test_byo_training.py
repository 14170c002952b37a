"""Quantization-aware training from data files: tokenized or preprocessed once into the training's own cache.

`quantcli run` (the library function, in this process) on a token classifier trained from a JSONL file
of words and per-word tags, and on an image classifier trained from class folders; the export report
then scores the trained int8 model by the task's metric.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from quantcli import pipeline
from tests import byo
from tests.conftest import session_dir

pytestmark = pytest.mark.slow


OUTPUTS = ["calibrated", "captured", "converted", "model.onnx", "model.report.json", "prepared", "trained"]


@pytest.fixture(scope="session")
def hf(tmp_path_factory, worker_id):
    return byo.folders(session_dir(tmp_path_factory, worker_id))


def test_token_classifier_trains_from_jsonl(tmp_path, hf):
    tags = str(hf / "text" / "tags.jsonl")
    recipe = {
        "model": {"huggingface": str(hf / "tok"), "task": "token-classification"},
        "calibration": {"data": tags, "text": "tokens", "max_length": 24, "batch_size": 8},
        "training": {
            "data": tags,
            "text": "tokens",
            "targets": "tags",
            "batch_size": 8,
            "epochs": 2,
            "optimizer": {"name": "adamw", "lr": 0.01},
        },
        "evaluation": {"data": tags, "text": "tokens", "targets": "tags"},
    }
    results = pipeline.run(byo.write_recipe(tmp_path, recipe), tmp_path / "w")
    trained = next(r for r in results if r.stage == "trained")
    assert trained.manifest["recipe"]["training"]["loss"] == "cross_entropy"  # over tokens, -100 ignored
    assert trained.details["steps"] == 4 and np.isfinite(trained.details["final_loss"])
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == OUTPUTS  # the preprocessed cache went with the run
    evaluation = json.loads((tmp_path / "w" / "model.report.json").read_text())["evaluation"]
    assert evaluation["metric"] == "token_accuracy"
    words = sum(len(t.split()) for t in byo.WORDS)
    assert evaluation["tokens"] == {"fp32_torch": words, "fp32_onnx": words, "int8_onnx": words}
    # the fp32 reference is the model as captured (random here); the trained int8 one learned the tags
    assert evaluation["int8_onnx"] >= 0.85 > evaluation["fp32_torch"]


def test_image_classifier_trains_from_class_folders(tmp_path, hf):
    images = str(hf / "images")
    recipe = {
        "model": {"huggingface": str(hf / "resnet"), "task": "image-classification"},
        "training": {"data": images, "batch_size": 4, "epochs": 1, "freeze_bn_after": 0.5},
        "evaluation": {"data": images, "batch_size": 6},
    }
    results = pipeline.run(byo.write_recipe(tmp_path, recipe), tmp_path / "w")
    assert [r.stage for r in results] == ["captured", "prepared", "trained", "converted", "exported"]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [n for n in OUTPUTS if n != "calibrated"]
    evaluation = json.loads((tmp_path / "w" / "model.report.json").read_text())["evaluation"]
    assert evaluation["metric"] == "accuracy" and evaluation["samples"] == 12
