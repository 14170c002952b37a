"""The CLI contract as a CI shell script uses it: each stage a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from tests.recipes import write_recipe

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits" / "recipe.yaml"


def quantcli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "quantcli", *args], capture_output=True, text=True, cwd=cwd, env=env)


def chain(recipe: Path, w: Path) -> list[subprocess.CompletedProcess]:
    steps = [
        ("capture", "--recipe", str(recipe), "-o", str(w / "captured")),
        ("prepare", str(w / "captured"), "-o", str(w / "prepared")),
        ("calibrate", str(w / "prepared"), "-o", str(w / "calibrated")),
        ("convert", str(w / "calibrated"), "-o", str(w / "converted"), "--fold-quantize"),
        ("export", str(w / "converted"), "-o", str(w / "model.onnx")),
    ]
    results = []
    for step in steps:
        results.append(quantcli(*step))
        assert results[-1].returncode == 0, results[-1].stderr
    return results


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    w = tmp_path_factory.mktemp("digits") / "w"
    return w, chain(DIGITS, w)


def test_digits_chain_writes_each_stage_and_prints_results(digits):
    w, results = digits
    assert sorted(p.name for p in w.iterdir()) == ["calibrated", "captured", "converted", "model.onnx",
                                                   "model.report.json", "prepared"]
    for name, files in {"captured": {"program.pt2"}, "prepared": {"program.pt2", "state.pt"},
                        "calibrated": {"program.pt2", "state.pt"}, "converted": {"program.pt2", "float.pt2"}}.items():
        assert {p.name for p in (w / name).iterdir()} == files | {"manifest.json", "timings.json"}
        manifest = json.loads((w / name / "manifest.json").read_text())
        assert manifest["stage"] == name and set(manifest["files"]) == files
    for result, out in zip(results, ["captured", "prepared", "calibrated", "converted", "model.onnx"]):
        assert result.stdout.strip() == str(w / out)  # stdout carries the result
        assert f"wrote {w / out} in " in result.stderr  # one closing line per stage on stderr


def test_digits_int8_onnx_keeps_fp32_accuracy(digits):
    w, _ = digits
    report = json.loads((w / "model.report.json").read_text())
    ev = report["evaluation"]
    assert ev["fp32_torch"] >= 0.97
    assert ev["int8_onnx"] >= ev["fp32_torch"] - 0.003  # within 0.3 points, ORT optimizations on
    assert report["parity"]["passed"]


def test_digits_onnx_carries_manifest_and_shapes(digits):
    w, _ = digits
    model = onnx.load(str(w / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["quantcli.stage"]) == "exported" and json.loads(meta["quantcli.status"]) == "ok"
    assert model.opset_import[0].version == 18
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    produced = {o for n in model.graph.node for o in n.output} - {"logits"}
    assert produced <= {v.name for v in model.graph.value_info}
    assert not (w / "model.onnx.data").exists()  # one self-contained file


def test_inspect_json_of_each_stage(digits):
    w, _ = digits
    for name, stage in [("captured", "captured"), ("converted", "converted"), ("model.onnx", "exported")]:
        result = quantcli("inspect", str(w / name), "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["manifest"]["stage"] == stage


def test_transformer_chain_as_separate_processes(tmp_path):
    recipe = write_recipe(tmp_path, "bert")
    w = tmp_path / "w"
    chain(recipe, w)
    report = json.loads((w / "model.report.json").read_text())
    assert report["parity"]["passed"]
    model = onnx.load(str(w / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.INT64}
