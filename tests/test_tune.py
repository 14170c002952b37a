"""`quantcli tune`: a goal plain PTQ misses is met by changing one layer; its recipe reproduces the ONNX."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import DIGITS, assert_fails, cli
from tests.recipes import MODELS_FILE, write_recipe
from tests.tolerances import QUANTIZATION, TUNE_MAX_TRIALS

pytestmark = pytest.mark.slow

TRIAL_KEYS = {"trial", "change", "overrides", "status", "sqnr_db", "latency_ms"}
STAGE_OUTPUTS = ["captured", "prepared", "calibrated", "converted", "model.onnx", "model.report.json"]


@pytest.fixture(scope="module")
def outlier_recipe(tmp_path_factory) -> Path:
    """The MLP with outlier channels in fc1's output, equalization off: plain PTQ keeps 1.3 dB."""
    return write_recipe(
        tmp_path_factory.mktemp("outlier"),
        "mlp",
        model={"factory": f"{MODELS_FILE}:mlp_outlier"},
        quantization={"equalize": False, **QUANTIZATION},
    )


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
    assert 1 <= len(doc["trials"]) <= TUNE_MAX_TRIALS and all(set(t) == TRIAL_KEYS for t in doc["trials"])
    assert [t["trial"] for t in doc["trials"]] == list(range(1, len(doc["trials"]) + 1))
    assert doc["reproduces_best_trial"] is True
    assert {"model.onnx", "recipe.yaml", "tune.json", "trials"} <= {p.name for p in out.iterdir()}


def test_the_best_trial_is_linked_not_rerun_and_a_run_of_its_recipe_reuses_it(tuned, tmp_path):
    import onnx

    out, run = tuned
    assert run.rc == 0, run.stderr
    best = out / "trials" / f"{run.json()['best']['trial']:02d}"
    # the best trial's own outputs (a rerun of the tuned recipe would record it in the captured manifest)
    sources = {"captured": out / "trials" / "00" / "captured", **{n: best / n for n in STAGE_OUTPUTS[1:4]}}
    for name, src in sources.items():
        assert (out / name / "manifest.json").read_bytes() == (src / "manifest.json").read_bytes()
    assert (out / "model.onnx").read_bytes() == (best / "model.onnx").read_bytes()
    again = cli("run", "--recipe", out / "recipe.yaml", "-o", out, "--json")
    assert again.rc == 0, again.stderr
    assert [r["reused"] for r in again.json()["stages"]] == [True] * 5
    fresh = cli("run", "--recipe", out / "recipe.yaml", "-o", tmp_path / "again")
    assert fresh.rc == 0, fresh.stderr
    graphs = [onnx.load(str(folder / "model.onnx")) for folder in (out, tmp_path / "again")]
    for g in graphs:
        del g.metadata_props[:]  # the lineage hashes name the trial's chain
    assert graphs[0].SerializeToString() == graphs[1].SerializeToString()


def test_tune_onto_the_recipes_own_folder_leaves_it_byte_identical(outlier_recipe, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipe.yaml").write_bytes(outlier_recipe.read_bytes() + b"# my notes\n")
    before = (work / "recipe.yaml").read_bytes()
    for extra in ([], ["--force"]):
        failed = cli("tune", "--recipe", work / "recipe.yaml", "-o", work, "--min-sqnr", "25", *extra)
        assert_fails(failed, 4, "recipe.yaml is the recipe tune reads", "-o")
    assert (work / "recipe.yaml").read_bytes() == before and sorted(p.name for p in work.iterdir()) == ["recipe.yaml"]


def test_tune_refuses_files_it_did_not_write_unless_force(tuned, outlier_recipe, work, tmp_path):
    out, run = tuned
    w = tmp_path / "w"
    shutil.copytree(out / "trials", w / "trials")  # the same trials: reused, not rerun
    w.joinpath("recipe.yaml").write_text("mine: true\n")
    args = ("tune", "--recipe", outlier_recipe, "-o", w, "--min-sqnr", "25", "--max-trials", "0")
    assert_fails(cli(*args), 4, "recipe.yaml exists and was not written by quantcli tune", "--force")
    assert w.joinpath("recipe.yaml").read_text() == "mine: true\n" and not (w / "captured").exists()
    w.joinpath("recipe.yaml").unlink()
    w.joinpath("tune.json").write_text("{}\n")
    assert_fails(cli(*args), 4, "tune.json exists and was not written by quantcli tune")
    w.joinpath("tune.json").unlink()
    shutil.copytree(work / "captured", w / "captured")  # another model's capture (the shared digits chain's)
    assert_fails(cli(*args), 4, "captured exists and was made from other inputs or options", "--force")
    manifest = "captured/manifest.json"
    assert (w / manifest).read_bytes() == (work / manifest).read_bytes()
    assert not (w / "tune.json").exists() and not (w / "recipe.yaml").exists()
    forced = cli(*args, "--force", "--json")
    assert forced.rc == 6, forced.stderr  # the goal is not met without a trial; everything written
    assert all((w / name).exists() for name in STAGE_OUTPUTS + ["recipe.yaml", "tune.json"])
    rerun = cli(*args)  # tune's own files, its own artifacts: no --force needed again
    assert rerun.rc == 6 and "not met" in rerun.stderr


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
    run = cli(
        "tune",
        "--recipe",
        DIGITS / "recipe.yaml",
        "-o",
        tmp_path / "w",
        "--max-drop",
        "0.01",
        "--metric",
        f"{metric}:top1",
        "--json",
    )
    assert run.rc == 0, run.stderr
    doc = run.json()
    assert doc["metric"] == "callable" and doc["fp32_torch"] == pytest.approx(0.995)
    assert doc["achieved"] and doc["baseline"]["drop"] <= 0.01 and doc["trials"] == []
    assert doc["data"] == {"section": "evaluation", "batches": 7}


def test_goal_errors(outlier_recipe, tmp_path):
    assert_fails(cli("tune", "--recipe", outlier_recipe, "-o", tmp_path / "w"), 2, "exactly one goal")
    assert_fails(
        cli("tune", "--recipe", outlier_recipe, "-o", tmp_path / "w", "--max-drop", "0.01"),
        2,
        "--max-drop needs an evaluation",
    )
    assert not (tmp_path / "w").exists()


def test_tune_on_a_transformer(tmp_path):
    """The BERT-style encoder: its pooler is the weakest layer; keeping it in float gains the goal."""
    recipe = write_recipe(tmp_path, "bert")
    # measured (target avx2): baseline 35.9 dB, the pooler's percentile observer 35.9, the pooler in float 40.5
    run = cli("tune", "--recipe", recipe, "-o", tmp_path / "w", "--min-sqnr", "39", "--max-trials", "2", "--json")
    assert run.rc == 0, run.stderr
    doc = run.json()
    assert doc["ranking"][0] == "pooler" and doc["baseline"]["sqnr_db"] < 39 <= doc["best"]["sqnr_db"]
    assert doc["layers_changed"] == ["pooler"] and len(doc["trials"]) == 2


def test_a_layers_fix_starts_from_the_observer_a_glob_gave_it(tmp_path):
    """`fc*` sets minmax: fc1's first trial is minmax's alternative (histogram), and the fix keeps the glob's
    other fields (the policy merges the overrides matching a module field by field)."""
    recipe = write_recipe(
        tmp_path,
        "mlp",
        model={"factory": f"{MODELS_FILE}:mlp_outlier"},
        quantization={"equalize": False, "overrides": [{"names": ["fc*"], "observer": "minmax", "reduce_range": True}]},
    )
    run = cli("tune", "--recipe", recipe, "-o", tmp_path / "w", "--min-sqnr", "60", "--max-trials", "1", "--json")
    assert run.rc == 6, run.stderr
    doc = json.loads((tmp_path / "w" / "tune.json").read_text())
    assert [t["change"] for t in doc["trials"]] == ["fc1: observer histogram"]


def test_a_drop_goal_the_baseline_misses_is_met_by_a_trial(tmp_path):
    """Accuracy against the fp32 model's own predictions: plain PTQ of the outlier MLP loses most of them,
    keeping fc2 in float wins them back; the drop is fp32_torch minus int8_onnx, in accuracy units."""
    import numpy as np
    import torch

    from tests.models import example_batch, mlp_outlier

    x = example_batch("mlp", batch=96, seed=5)["x"]
    with torch.no_grad():
        labels = mlp_outlier()(x).argmax(-1)
    np.savez(tmp_path / "eval.npz", x=x.numpy(), y=labels.numpy())
    recipe = write_recipe(
        tmp_path,
        "mlp",
        model={"factory": f"{MODELS_FILE}:mlp_outlier"},
        quantization={"equalize": False},
        evaluation={"data": str(tmp_path / "eval.npz"), "targets": "y", "metric": "accuracy", "batch_size": 32},
    )
    run = cli("tune", "--recipe", recipe, "-o", tmp_path / "w", "--max-drop", "0.02", "--json")
    assert run.rc == 0, run.stderr
    doc = run.json()
    assert (
        doc["metric"] == "accuracy"
        and doc["fp32_torch"] == 1.0
        and doc["data"] == {"section": "evaluation", "batches": 3}
    )
    assert doc["baseline"]["drop"] > 0.02 >= doc["best"]["drop"] and doc["best"]["trial"] >= 1
    for measured in [doc["baseline"], *doc["trials"]]:
        assert set(measured) >= {"int8_onnx", "drop"} and measured["drop"] == pytest.approx(1.0 - measured["int8_onnx"])
    assert doc["layers_changed"] == ["fc2"]
