"""`quantcli tune`: a goal plain PTQ misses is met by changing one layer; its recipe reproduces the ONNX."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import DIGITS, assert_fails, cli
from tests.recipes import MODELS_FILE, write_recipe

pytestmark = pytest.mark.slow

TRIAL_KEYS = {"trial", "change", "overrides", "status", "sqnr_db", "latency_ms"}


@pytest.fixture(scope="module")
def outlier_recipe(tmp_path_factory) -> Path:
    """The MLP with outlier channels in fc1's output, equalization off: plain PTQ keeps 1.3 dB."""
    return write_recipe(tmp_path_factory.mktemp("outlier"), "mlp", model={"factory": f"{MODELS_FILE}:mlp_outlier"},
                        quantization={"equalize": False})


@pytest.fixture(scope="module")
def tuned(outlier_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "w"
    run = cli("tune", "--recipe", outlier_recipe, "-o", out, "--min-sqnr", "25", "--json")
    return out, run


def test_tune_meets_a_goal_plain_ptq_misses_with_one_layer(tuned):
    out, run = tuned
    assert run.rc == 0, run.stderr
    doc = run.json()
    assert doc == json.loads((out / "tune.json").read_text())
    assert doc["achieved"] and doc["goal"] == {"min_sqnr_db": 25.0}
    assert doc["baseline"]["sqnr_db"] < 5 and doc["best"]["sqnr_db"] >= 25
    assert doc["layers_changed"] == ["fc2"] and doc["best"]["overrides"] == [{"names": ["fc2"], "exclude": True}]
    assert doc["ranking"][0] == "fc1" and "fc2" in doc["ranking"]
    assert 1 <= len(doc["trials"]) <= 4 and all(set(t) == TRIAL_KEYS for t in doc["trials"])
    assert [t["trial"] for t in doc["trials"]] == list(range(1, len(doc["trials"]) + 1))
    assert doc["reproduces_best_trial"] is True
    assert {"model.onnx", "recipe.yaml", "tune.json", "trials"} <= {p.name for p in out.iterdir()}


def test_a_plain_run_of_the_written_recipe_gives_the_same_onnx_bytes(tuned, tmp_path):
    out, run = tuned
    assert run.rc == 0, run.stderr
    again = cli("run", "--recipe", out / "recipe.yaml", "-o", tmp_path / "again")
    assert again.rc == 0, again.stderr
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_an_unmet_goal_still_writes_the_best_and_exits_6(tuned, outlier_recipe, tmp_path):
    out, run = tuned
    shutil.copytree(out / "trials", tmp_path / "w" / "trials")  # the same trials: reused, not rerun
    failed = cli("tune", "--recipe", outlier_recipe, "-o", tmp_path / "w", "--min-sqnr", "300", "--max-trials", "1")
    assert_fails(failed, 6, "output SQNR >= 300.0 dB not met in 1 trial(s)")
    doc = json.loads((tmp_path / "w" / "tune.json").read_text())
    assert not doc["achieved"] and len(doc["trials"]) == 1 and doc["best"]["trial"] == 0
    assert (tmp_path / "w" / "model.onnx").is_file()


def test_bundled_example_meets_a_drop_goal_with_a_metric_callable(tmp_path):
    metric = tmp_path / "metric.py"
    metric.write_text("def top1(outputs, targets):\n    return float((outputs.argmax(1) == targets).mean())\n")
    run = cli("tune", "--recipe", DIGITS / "recipe.yaml", "-o", tmp_path / "w", "--max-drop", "0.01",
              "--metric", f"{metric}:top1", "--json")
    assert run.rc == 0, run.stderr
    doc = run.json()
    assert doc["metric"] == "callable" and doc["fp32_metric"] == pytest.approx(0.995)
    assert doc["achieved"] and doc["baseline"]["drop"] <= 0.01 and doc["trials"] == []
    assert doc["data"] == {"section": "evaluation", "batches": 7}


def test_goal_errors(outlier_recipe, tmp_path):
    assert_fails(cli("tune", "--recipe", outlier_recipe, "-o", tmp_path / "w"), 2, "exactly one goal")
    assert_fails(cli("tune", "--recipe", outlier_recipe, "-o", tmp_path / "w", "--max-drop", "0.01"), 2,
                 "--max-drop needs an evaluation")
    assert not (tmp_path / "w").exists()


def test_tune_on_a_transformer(tmp_path):
    """The BERT-style encoder: its pooler is the weakest layer; keeping it in float gains the goal."""
    recipe = write_recipe(tmp_path, "bert")
    run = cli("tune", "--recipe", recipe, "-o", tmp_path / "w", "--min-sqnr", "42", "--max-trials", "2", "--json")
    assert run.rc == 0, run.stderr
    doc = run.json()
    assert doc["ranking"][0] == "pooler" and doc["baseline"]["sqnr_db"] < 42 <= doc["best"]["sqnr_db"]
    assert doc["layers_changed"] == ["pooler"] and len(doc["trials"]) == 2
