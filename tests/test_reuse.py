"""Reuse across edits of later recipe sections, and the exported model's integrity on reuse."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from quantcli import artifacts
from tests.conftest import DIGITS, assert_fails, cli, digits_recipe, snapshot


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
    assert_fails(
        cli("export", work / "converted", "-o", tmp_path / "model.onnx", "--force"),
        4,
        f"{tmp_path / 'model.report.json'} exists and was not written by quantcli export",
    )
    assert (tmp_path / "model.report.json").read_text() == "my notes\n"
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.slow
def test_an_unreadable_model_beside_its_report_is_replaced_only_with_force(copy_work):
    w = copy_work("converted", "model.onnx", "model.report.json")
    (w / "model.onnx").write_bytes(b"\x00truncated")
    args = ["export", w / "converted", "-o", w / "model.onnx"]
    assert_fails(
        cli(*args), 4, f"{w / 'model.onnx'} exists and is a corrupt quantcli model", "pass --force to replace it"
    )
    assert cli(*args, "--force").rc == 0


def split_digits_factory(folder: Path) -> Path:
    """The digits example with its factory split in two files: model.py does `from netdef import build`."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(DIGITS / "model.py", folder / "netdef.py")
    shutil.copy2(DIGITS / "net.pt", folder / "net.pt")
    (folder / "model.py").write_text("from netdef import build\n")
    recipe = yaml.safe_load(digits_recipe(folder).read_text())
    recipe["model"]["factory"] = f"{folder / 'model.py'}:build"
    recipe["model"]["kwargs"] = {"checkpoint": str(folder / "net.pt")}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder / "recipe.yaml"


def test_a_change_in_a_module_the_factory_imports_is_never_reused(tmp_path):
    recipe = split_digits_factory(tmp_path / "proj")
    work = tmp_path / "work"
    first = cli("run", "--recipe", recipe, "-o", work, "--json")
    assert first.rc == 0, first.stderr
    captured = json.loads((work / "captured" / "manifest.json").read_text())
    assert set(captured["data"]) == {"model.factory", "model.kwargs.checkpoint", "model source netdef.py"}
    assert all(cli("run", "--recipe", recipe, "-o", work, "--json").json()["stages"][i]["reused"] for i in range(5))
    netdef = tmp_path / "proj" / "netdef.py"
    netdef.write_text(netdef.read_text().replace("nn.ReLU(inplace=False)", "nn.ReLU6(inplace=False)", 1))
    before = snapshot(work)
    assert_fails(
        cli("run", "--recipe", recipe, "-o", work),
        4,
        f"{work / 'captured'} exists and was made from "
        "other inputs or options: model source netdef.py changed (pass --force to replace it)",
    )
    assert snapshot(work) == before
    again = cli("run", "--recipe", recipe, "-o", work, "--force")
    assert again.rc == 0, again.stderr
    assert f"captured: redone {work / 'captured'} in " in again.stderr
    assert "(model source netdef.py changed)" in again.stderr
    ops = {node.op_type for node in onnx.load(str(work / "model.onnx")).graph.node}
    assert "Clip" in ops  # ReLU6: the new architecture was exported, not the old one
    assert (
        json.loads((work / "captured" / "manifest.json").read_text())["data"]["model source netdef.py"]
        == hashlib.sha256(netdef.read_bytes()).hexdigest()
    )


def test_a_library_version_keys_the_stage_and_is_named_when_it_is_redone(copy_work, monkeypatch):
    w = copy_work("prepared", "calibrated")
    args = ["calibrate", w / "prepared", "-o", w / "calibrated"]
    assert cli(*args, "--json").json()["reused"]
    installed = artifacts.library_versions()["torchao"]
    monkeypatch.setattr(artifacts, "library_versions", lambda: dict(artifacts._versions(), torchao="0.99.0"))
    assert_fails(cli(*args), 4, f"torchao {installed} -> 0.99.0 (pass --force to replace it)")
    redo = cli(*args, "--force", "--json")
    assert redo.rc == 0 and not redo.json()["reused"], redo.stderr
    assert redo.json()["redone"] == f"torchao {installed} -> 0.99.0"
    assert redo.json()["manifest"]["versions"]["torchao"] == "0.99.0"


DATA_CALLABLE = """from pathlib import Path

import numpy as np


def batches():
    pixels = np.load(Path(__file__).with_name("pixels.npy"))
    for start in range(0, len(pixels), 32):
        yield {"calib_x": pixels[start:start + 32]}


def noise():
    for _ in range(2):
        yield {"calib_x": np.random.rand(32, 1, 8, 8).astype(np.float32)}
"""


def test_a_data_callable_is_keyed_by_what_it_yields(work, tmp_path):
    pixels = np.load(DIGITS / "digits.npz")["calib_x"][:64]
    np.save(tmp_path / "pixels.npy", pixels)
    (tmp_path / "data.py").write_text(DATA_CALLABLE)
    args = ["calibrate", work / "prepared", "-o", tmp_path / "calibrated", "--data", f"{tmp_path / 'data.py'}:batches"]
    first = cli(*args, "--json")
    assert first.rc == 0 and not first.json()["reused"], first.stderr
    assert first.json()["manifest"]["data"]["calibration.data"].startswith("yields ")
    assert cli(*args, "--json").json()["reused"]
    np.save(tmp_path / "pixels.npy", pixels * 0.5)  # the data behind the callable changes, its code does not
    assert_fails(cli(*args), 4, "exists and was made from other inputs or options: calibration.data changed")
    redo = cli(*args, "--force", "--json")
    assert redo.rc == 0 and redo.json()["redone"] == "calibration.data changed", redo.stderr


def test_a_data_callable_that_yields_other_batches_each_call_is_never_reused(work, tmp_path):
    (tmp_path / "data.py").write_text(DATA_CALLABLE)
    args = ["calibrate", work / "prepared", "-o", tmp_path / "calibrated", "--data", f"{tmp_path / 'data.py'}:noise"]
    first = cli(*args)
    assert first.rc == 0, first.stderr
    assert f"calibration.data: {tmp_path / 'data.py'}:noise yielded other batches when called again" in first.stderr
    assert_fails(cli(*args), 4, "calibration.data changed")


def test_a_package_module_factory_is_keyed_by_its_projects_files(tmp_path, monkeypatch):
    package = tmp_path / "netpkg_keyed"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "layers.py").write_text("from torch import nn\n\nACT = nn.ReLU\n")
    (package / "net.py").write_text(
        "from torch import nn\n\nfrom netpkg_keyed.layers import ACT\n\n\n"
        "def build():\n    return nn.Sequential(nn.Linear(4, 3), ACT())\n"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump({"model": {"factory": "netpkg_keyed.net:build"}, "inputs": [{"name": "x", "shape": [2, 4]}]})
    )
    monkeypatch.chdir(tmp_path)
    run = cli("capture", "--recipe", recipe, "-o", tmp_path / "captured", "--json")
    assert run.rc == 0, run.stderr
    data = run.json()["manifest"]["data"]
    assert set(data) == {
        "model source netpkg_keyed/__init__.py",
        "model source netpkg_keyed/layers.py",
        "model source netpkg_keyed/net.py",
    }
    (package / "layers.py").write_text("from torch import nn\n\nACT = nn.ReLU6\n")
    assert_fails(
        cli("capture", "--recipe", recipe, "-o", tmp_path / "captured"),
        4,
        "model source netpkg_keyed/layers.py changed",
    )
