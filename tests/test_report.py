"""`quantcli report`: per-layer SQNR keyed by module, a planted bad layer named first, JSON, plot, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantcli import artifacts
from tests.conftest import assert_fails, cli

LAYER_KEYS = {"name", "node", "module", "module_type", "op", "depth", "quantized_output", "local_db", "accumulated_db"}
ORT_KEYS = {"ort_vs_int8_db", "ort_vs_fp32_db"}
TOP_KEYS = {"layers", "worst", "model", "artifact", "onnx", "data", "sizes", "unmatched"}


def report_json(*args) -> dict:
    run = cli("report", *args, "--json")
    assert run.rc == 0, run.stderr
    return run.json()


def _corrupt_range(calibrated: Path, module: str, factor: float) -> None:
    """Widen the calibrated output range of `module`'s op by `factor` and reseal the artifact's manifest."""
    import torch

    from quantcli.stages.base import restore_prepared

    art = artifacts.open_artifact(calibrated, ("calibrated",), "test")
    prepared = restore_prepared(art)
    observers = [
        n.target
        for n in prepared.graph.nodes
        if n.op == "call_module"
        and n.target.startswith("activation_")
        and n.args[0].op == "call_function"
        and [v[0] for v in n.args[0].meta["nn_module_stack"].values()][-1] == module
    ]
    assert len(observers) == 1, observers
    state = torch.load(calibrated / artifacts.STATE, weights_only=True)
    for key in ("min_val", "max_val"):
        state[f"{observers[0]}.{key}"] *= factor
    torch.save(state, calibrated / artifacts.STATE)
    manifest = json.loads((calibrated / artifacts.MANIFEST).read_text())
    manifest["files"][artifacts.STATE] = {
        "sha256": artifacts.sha256_file(calibrated / artifacts.STATE),
        "size": (calibrated / artifacts.STATE).stat().st_size,
    }
    (calibrated / artifacts.MANIFEST).write_bytes(artifacts.canonical(manifest))


@pytest.fixture(scope="module")
def planted(chained, tmp_path_factory) -> Path:
    """The MLP chain with fc2's output range corrupted 100x after calibration, converted and exported."""
    w = tmp_path_factory.mktemp("planted")
    shutil.copytree(chained("mlp") / "calibrated", w / "calibrated")
    _corrupt_range(w / "calibrated", "fc2", 100.0)
    assert cli("convert", w / "calibrated", "-o", w / "converted").rc == 0
    run = cli("export", w / "converted", "-o", w / "model.onnx", "--json")
    # ORT rounds the wrecked layer as PyTorch int8 does: its excess error over fp32 stays small, parity passes
    assert run.rc == 0, run.stderr
    assert run.json()["report"]["parity"]["passed"] is True
    return w


def test_convert_keeps_the_calibrated_state_report_needs(chained):
    w = chained("mlp")
    converted = artifacts.open_artifact(w / "converted", ("converted",), "test")
    calibrated = artifacts.open_artifact(w / "calibrated", ("calibrated",), "test")
    files = converted.manifest["files"]
    assert files[artifacts.STATE] == calibrated.manifest["files"][artifacts.STATE]
    assert files[artifacts.FLOAT_PROGRAM] == calibrated.manifest["files"][artifacts.PROGRAM]


def test_a_corrupted_layer_is_named_first(planted, chained):
    doc = report_json(planted / "converted", "--onnx", planted / "model.onnx")
    layers = {d["name"]: d for d in doc["layers"]}
    assert doc["worst"][0] == "fc2"
    assert layers["fc2"]["local_db"] < 15
    assert all(d["local_db"] > 30 for name, d in layers.items() if name != "fc2"), layers
    # its error carries on: every later layer's accumulated SQNR is as bad, while the earlier ones are not
    assert layers["fc3"]["accumulated_db"] < 15 and layers["fc1"]["accumulated_db"] > 30
    # and ONNX Runtime agrees with the PyTorch int8 model at fc2: the loss is quantization's, not ORT's
    assert layers["fc2"]["ort_vs_int8_db"] > 40
    healthy = {d["name"]: d for d in report_json(chained("mlp") / "converted")["layers"]}
    assert healthy["fc2"]["local_db"] > 35
    assert healthy["fc2"]["local_db"] - layers["fc2"]["local_db"] > 25


@pytest.mark.slow
def test_json_keys_and_ort_taps_on_a_transformer(chained):
    w = chained("bert")
    doc = report_json(w / "converted", "--onnx", w / "model.onnx", "--batches", "2")
    assert set(doc) == TOP_KEYS | {"kernels"} and doc["unmatched"] == []
    assert doc["data"] == {"section": "calibration", "source": doc["data"]["source"], "batches": 2, "samples": 16}
    assert all(set(d) == LAYER_KEYS | ORT_KEYS for d in doc["layers"])
    assert sorted(doc["worst"]) == sorted(d["name"] for d in doc["layers"])
    assert [d["depth"] for d in doc["layers"]] == list(range(len(doc["layers"])))
    modules = {d["module"] for d in doc["layers"]}
    assert {"layers.0.attention.query", "layers.0.attention", "layers.1.output", "pooler"} <= modules, modules
    assert not any(d["op"].startswith(("view", "transpose", "reshape")) for d in doc["layers"])  # data movement
    tapped = [d for d in doc["layers"] if d["ort_vs_int8_db"] is not None]
    assert len(tapped) >= len(doc["layers"]) // 2, [(d["name"], d["op"], d["ort_vs_int8_db"]) for d in doc["layers"]]
    assert doc["kernels"]["fusions_kept_with_taps"] is True and doc["kernels"]["module_mismatch"] == []
    assert doc["kernels"]["coverage"]["integer"] == doc["kernels"]["coverage"]["total"] > 0
    assert doc["model"]["saved_vs_copy_db"] == 200.0
    out = doc["model"]["outputs"]
    assert set(out) == {"output_0"} and set(out["output_0"]) == {
        "int8_vs_fp32_db",
        "max_abs_error",
        "ort_vs_fp32_db",
        "ort_vs_int8_db",
        "ort_max_abs_error",
    }
    assert 20 < out["output_0"]["int8_vs_fp32_db"] < 80
    assert doc["sizes"]["int8_onnx"] == (w / "model.onnx").stat().st_size


def test_data_option_and_input_quantization(chained):
    w = chained("mlp")
    data = w.parent / "mlp.npz"
    doc = report_json(w / "converted", "--data", data, "--batches", "2")
    assert doc["data"] == {"section": "calibration", "source": str(data.resolve()), "batches": 2, "samples": 16}
    first = doc["layers"][0]
    assert (first["name"], first["op"], first["module"]) == ("x", "input", "")
    assert first["local_db"] == first["accumulated_db"] < 60  # nothing before it: both are input quantization


def test_text_table_lists_worst_first(chained):
    run = cli("report", chained("mlp") / "converted", "--batches", "1")
    assert run.rc == 0, run.stderr
    doc = report_json(chained("mlp") / "converted", "--batches", "1")
    rows = [line for line in run.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == len(doc["layers"])
    assert rows[0].split("│")[2].strip() == doc["worst"][0]
    assert "output output_0: int8 vs fp32" in run.stdout


def test_plot_is_a_png_of_the_json_series(chained, tmp_path):
    """What the figure's axes hold, read back from them, against the per-layer figures of the JSON."""
    import struct

    from quantcli.report.plot import plot

    w = chained("mlp")
    png = tmp_path / "layers.png"
    doc = report_json(w / "converted", "--onnx", w / "model.onnx", "--plot", png)
    assert doc["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = plot(doc, tmp_path / "again.png")
    assert list(struct.unpack(">II", png.read_bytes()[16:24])) == drawn["size_px"] == [1400, 450]  # two panels
    depth = [float(d["depth"]) for d in doc["layers"]]
    torch_panel = drawn["panels"]["PyTorch int8 vs fp32"]
    ort_panel = drawn["panels"]["ONNX Runtime (full optimizations)"]
    for panel, label, key in [
        (torch_panel, "local (fp32 input)", "local_db"),
        (torch_panel, "accumulated (int8 input)", "accumulated_db"),
        (ort_panel, "ORT vs fp32", "ort_vs_fp32_db"),
        (ort_panel, "ORT vs PyTorch int8", "ort_vs_int8_db"),
    ]:
        x, y = panel["lines"][label]
        expected = [np.nan if d[key] is None else min(d[key], 120.0) for d in doc["layers"]]
        assert x == depth and len(doc["layers"]) >= 3
        np.testing.assert_array_equal(y, expected)
    assert torch_panel["texts"] == doc["worst"][:3] and ort_panel["texts"] == []


def test_plot_refuses_a_file_it_did_not_write_unless_force(chained, tmp_path):
    w = chained("mlp")
    png = tmp_path / "mine.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n my own picture")
    args = ("report", w / "converted", "--plot", png, "--batches", "1")
    assert_fails(cli(*args), 4, "mine.png exists and was not written by quantcli report", "--force")
    assert png.read_bytes() == b"\x89PNG\r\n\x1a\n my own picture"
    assert cli(*args, "--force").rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    again = cli(*args)  # its own plot: replaced
    assert again.rc == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png"]  # no temporary left


@pytest.mark.slow
def test_bundled_example_uses_its_evaluation_data(work):
    doc = report_json(work / "converted", "--onnx", work / "model.onnx")
    assert doc["data"]["section"] == "evaluation" and doc["data"]["samples"] == 400
    ev = doc["evaluation"]
    assert ev["metric"] == "accuracy" and ev["fp32_torch"] >= 0.99
    assert abs(ev["drop"] - (ev["fp32_torch"] - ev["int8_onnx"])) < 1e-6 and ev["drop"] <= 0.01
    assert set(ev["top1_agreement"]) == {"int8_torch", "int8_onnx"} and 0.98 <= ev["top1_agreement"]["int8_onnx"] <= 1


def test_bad_inputs_are_one_line_errors(chained, tmp_path):
    w = chained("mlp")
    assert_fails(cli("report", w / "calibrated"), 4, "is a calibrated artifact", "quantcli convert")
    assert_fails(cli("report", tmp_path / "nothing"), 3, "does not exist")
    assert_fails(cli("report", w / "converted", "--onnx", tmp_path / "none.onnx"), 3, "file not found")
    assert_fails(cli("report", w / "converted", "--onnx", chained("bert") / "model.onnx"), 4, "was not exported from")
    assert_fails(cli("report", w / "converted", "--plot", tmp_path / "x.jpg"), 2, "PNG")
    assert_fails(cli("report", w / "converted", "--data", tmp_path / "none.npz"), 3, "not found")


@pytest.mark.slow
def test_after_qat_the_folded_convs_are_unmatched_and_the_rest_measured(qat_work):
    doc = report_json(qat_work / "converted", "--batches", "2")
    assert doc["unmatched"] and all(node.startswith("conv") for node in doc["unmatched"])
    ops = {d["op"] for d in doc["layers"]}
    assert {"relu.default", "linear.default"} <= ops and "conv2d.default" not in ops
    assert doc["data"]["section"] == "evaluation" and doc["evaluation"]["metric"] == "accuracy"
    assert all(d["local_db"] > 20 for d in doc["layers"]) and doc["model"]["saved_vs_copy_db"] == 200.0


class _Clocked:
    """An ONNX Runtime session stand-in whose every run takes `seconds` on a fake clock."""

    def __init__(self, clock: list[float], seconds: float):
        self.clock, self.seconds, self.runs = clock, seconds, 0

    def get_inputs(self) -> list:
        return []

    def run(self, names, feeds) -> list:
        self.clock[0] += self.seconds
        self.runs += 1
        return []


@pytest.mark.parametrize(("seconds", "runs"), [(0.01, 3 + 20), (0.5, 1 + 10), (4.0, 1 + 3)])
def test_latency_is_the_median_of_20_runs_or_of_what_fits_its_budget(monkeypatch, seconds, runs):
    """The export report's latency: 3 warm-up and 20 timed runs of a quick model; a large model's runs (an LLM's
    prefill takes seconds) as many as fit 5 s, one warm-up and at least 3 timed."""
    from quantcli.onnx import runtime

    clock = [0.0]
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    session = _Clocked(clock, seconds)
    assert runtime.latency_ms(session, {}) == pytest.approx(seconds * 1000)
    assert session.runs == runs
