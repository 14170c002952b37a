"""Reuse across edits of later recipe sections, and the exported model's integrity on reuse."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from quantcli import artifacts

from tests.conftest import assert_fails, cli, snapshot


@pytest.mark.slow
def test_run_reuses_capture_when_only_later_sections_change(shared_recipe, copy_work, tmp_path):
    w = copy_work("captured", "prepared", "calibrated")
    early = snapshot(w / "captured") | {f"prepared/{k}": v for k, v in snapshot(w / "prepared").items()}
    recipe = yaml.safe_load(shared_recipe.read_text())
    recipe["calibration"]["num_batches"] = 2
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(recipe))
    # calibrated/ was made from the other calibration section: refused, after capture and
    # prepare were reused untouched (timings.json included: they were not rewritten)
    assert_fails(cli("run", "--recipe", edited, "-o", w), 4, f"{w / 'calibrated'} exists")
    assert snapshot(w / "captured") | {f"prepared/{k}": v for k, v in snapshot(w / "prepared").items()} == early
    (w / "calibrated").rename(tmp_path / "old-calibrated")
    run = cli("run", "--recipe", edited, "-o", w, "--json")
    assert run.rc == 0, run.stderr
    stages = {doc["stage"]: doc for doc in run.json()["stages"]}
    assert stages["captured"]["reused"] and stages["prepared"]["reused"]
    assert stages["calibrated"]["manifest"]["batches"] == 2


def test_a_changed_export_section_is_seen_by_run(copy_work, shared_recipe, tmp_path):
    w = copy_work("captured", "prepared", "calibrated", "converted")
    recipe = yaml.safe_load(shared_recipe.read_text())
    recipe["export"]["parity_min_sqnr_db"] = 21.5
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(recipe))
    run = cli("run", "--recipe", edited, "-o", w, "--json")
    assert run.rc == 0, run.stderr
    reused = {doc["stage"]: doc["reused"] for doc in run.json()["stages"]}
    assert reused == {"captured": True, "prepared": True, "calibrated": True, "converted": True, "exported": False}
    assert json.loads((w / "model.report.json").read_text())["parity"]["threshold_db"] == 21.5


def test_a_model_that_does_not_match_its_report_is_exported_again(copy_work):
    w = copy_work("converted", "model.onnx", "model.report.json")
    args = ["export", w / "converted", "-o", w / "model.onnx", "--json"]
    assert cli(*args).json()["reused"]  # same key, intact
    data = bytearray((w / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # flip a bit inside the graph (initializers); the metadata at the end stays readable
    (w / "model.onnx").write_bytes(bytes(data))
    shown = cli("inspect", w / "model.onnx", "--json")
    assert "report" not in shown.json() and "records another sha256" in shown.json()["report_mismatch"]
    redo = cli(*args)
    assert redo.rc == 0 and not redo.json()["reused"], redo.stderr  # never reused nor believed: redone
    report = json.loads((w / "model.report.json").read_text())
    assert report["onnx_sha256"] == hashlib.sha256((w / "model.onnx").read_bytes()).hexdigest()


@pytest.mark.slow
def test_an_export_interrupted_between_its_two_renames_is_redone(copy_work, monkeypatch):
    """The model is renamed into place first, then its report: a kill in between leaves the new model
    beside the old report, whose sha256 names the old model; that pair is never reused."""
    from quantcli import staging
    from quantcli.stages import export

    w = copy_work("converted", "model.onnx", "model.report.json")
    old_report = (w / "model.report.json").read_bytes()
    real_replace, calls = staging.os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if str(dst).endswith(".report.json"):
            raise KeyboardInterrupt  # SIGINT between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(staging.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.run(w / "converted", w / "model.onnx", opset=20, force=True)  # another key: a new model
    monkeypatch.setattr(staging.os, "replace", real_replace)
    assert (w / "model.report.json").read_bytes() == old_report  # the torn pair: new model, old report
    assert [p.name for p in w.iterdir() if p.name.startswith(".")] == []  # the temporary report went too
    again = export.run(w / "converted", w / "model.onnx", opset=20)
    assert not again.reused and again.details["report"]["onnx_sha256"] == artifacts.sha256_file(w / "model.onnx")
    assert json.loads((w / "model.report.json").read_text())["onnx_sha256"] == again.details["report"]["onnx_sha256"]


def test_export_never_overwrites_a_users_report_file(work, tmp_path):
    (tmp_path / "model.report.json").write_text("my notes\n")
    assert_fails(cli("export", work / "converted", "-o", tmp_path / "model.onnx", "--force"), 4,
                 f"{tmp_path / 'model.report.json'} exists and was not written by quantcli export")
    assert (tmp_path / "model.report.json").read_text() == "my notes\n"
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.slow
def test_an_unreadable_model_beside_its_report_is_replaced_only_with_force(copy_work):
    w = copy_work("converted", "model.onnx", "model.report.json")
    (w / "model.onnx").write_bytes(b"\x00truncated")
    args = ["export", w / "converted", "-o", w / "model.onnx"]
    assert_fails(cli(*args), 4, f"{w / 'model.onnx'} exists and is a corrupt quantcli model",
                 "pass --force to replace it")
    assert cli(*args, "--force").rc == 0
