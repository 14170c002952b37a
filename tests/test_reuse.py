"""Reuse across edits of later recipe sections, and the exported model's integrity on reuse."""

from __future__ import annotations

import json

import yaml

from tests.conftest import assert_fails, quantcli, snapshot


def test_run_reuses_capture_when_only_later_sections_change(shared_recipe, copy_work, tmp_path):
    w = copy_work("captured", "prepared", "calibrated")
    early = snapshot(w / "captured") | {f"prepared/{k}": v for k, v in snapshot(w / "prepared").items()}
    recipe = yaml.safe_load(shared_recipe.read_text())
    recipe["calibration"]["num_batches"] = 2
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(recipe))
    # calibrated/ was made from the other calibration section: refused, after capture and
    # prepare were reused untouched (timings.json included: they were not rewritten)
    assert_fails(quantcli("run", "--recipe", edited, "-o", w), 4, f"{w / 'calibrated'} exists")
    assert snapshot(w / "captured") | {f"prepared/{k}": v for k, v in snapshot(w / "prepared").items()} == early
    (w / "calibrated").rename(tmp_path / "old-calibrated")
    run = quantcli("run", "--recipe", edited, "-o", w, "--json")
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
    run = quantcli("run", "--recipe", edited, "-o", w, "--json")
    assert run.rc == 0, run.stderr
    reused = {doc["stage"]: doc["reused"] for doc in run.json()["stages"]}
    assert reused == {"captured": True, "prepared": True, "calibrated": True, "converted": True, "exported": False}
    assert json.loads((w / "model.report.json").read_text())["parity"]["threshold_db"] == 21.5


def test_a_reused_model_must_match_its_report(copy_work):
    w = copy_work("converted", "model.onnx", "model.report.json")
    args = ["export", w / "converted", "-o", w / "model.onnx"]
    assert quantcli(*args).rc == 0  # same key, intact: reused
    data = bytearray((w / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # flip a bit inside the graph (initializers); the metadata at the end stays readable
    (w / "model.onnx").write_bytes(bytes(data))
    assert_fails(quantcli(*args), 4, f"{w / 'model.onnx'} does not match its report model.report.json")
    assert quantcli(*args, "--force").rc == 0


def test_export_never_overwrites_a_users_report_file(work, tmp_path):
    (tmp_path / "model.report.json").write_text("my notes\n")
    assert_fails(quantcli("export", work / "converted", "-o", tmp_path / "model.onnx", "--force"), 4,
                 f"{tmp_path / 'model.report.json'} exists and was not written by quantcli export")
    assert (tmp_path / "model.report.json").read_text() == "my notes\n"
    assert not (tmp_path / "model.onnx").exists()
