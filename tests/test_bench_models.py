"""The benchmark's model factories (configs/bench) build and run one forward pass.

The zoo CNNs need torchvision/timm, which live off the default path (tests/zoo_site explains why),
so they run in a child process with tests/zoo_site and .venv/zoo on PYTHONPATH. Forward passes use
64-px inputs to stay fast; the benchmark itself runs them at 224 px.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "configs" / "bench"
ZOO = ROOT / ".venv" / "zoo"

VISION_CHILD = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import vision
report = {}
x = torch.from_numpy(vision.photos(2, size=64))
for name in vision.MODELS:
    with torch.no_grad():
        y = vision.build(name)(x)
    report[name] = {"shape": list(y.shape), "finite": bool(torch.isfinite(y).all()),
                    "varies": float((y[0] - y[1]).abs().max())}
batch = next(iter(vision.calibration(batches=1, batch_size=2)))
report["calibration"] = {k: [list(v.shape), str(v.dtype)] for k, v in batch.items()}
print(json.dumps(report))
"""


@pytest.mark.skipif(not ZOO.is_dir(), reason="torchvision/timm are not installed in .venv/zoo")
def test_zoo_cnns_build_and_run():
    path = os.pathsep.join(map(str, [ROOT / "tests" / "zoo_site", ZOO, ROOT]))
    proc = subprocess.run(
        [sys.executable, "-c", VISION_CHILD, str(BENCH)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report.pop("calibration") == {"x": [[2, 3, 224, 224], "float32"]}
    assert len(report) == 8
    for name, r in report.items():
        assert r["shape"] == [2, 1000] and r["finite"] and r["varies"] > 0, (name, r)


def test_encoder_builds_and_runs():
    import torch

    spec = importlib.util.spec_from_file_location("bench_text", BENCH / "text.py")
    text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(text)
    rows = text.held_out(count=3)
    assert rows["input_ids"].shape == rows["attention_mask"].shape == (3, text.SEQ)
    assert (rows["input_ids"][:, 0] == text.CLS).all()
    lengths = rows["attention_mask"].sum(1)
    assert (rows["input_ids"][np.arange(3), lengths - 1] == text.SEP).all()
    model = text.encoder()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in rows.items()})
    assert out.shape == (3, 384) and torch.isfinite(out).all()
    ranges = text.activation_ranges(model, rows)
    assert ranges["fc1_input"]["outlier_max"] > 3 * ranges["fc1_input"]["other_p99"]  # the planted outliers


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sweep_inputs_fit_each_kind_of_architecture():
    """One architecture of each input kind: the arrays `inputs` makes have the recipe's names, shapes and dtypes."""
    archs = _script("sweep").architectures()
    sources = {archs.source(n) for n in archs.ARCHITECTURES}
    assert len(archs.ARCHITECTURES) >= 60 and sources == {"timm", "torchvision", "transformers"}
    first = {}
    for name, arch in archs.ARCHITECTURES.items():
        first.setdefault(arch.kind, name)
    assert set(first) == {"image", "encoder", "decoder", "pixels", "audio", "mels"}
    for name in first.values():
        rows = archs.inputs(name, 3, 0)
        specs = archs.input_specs(name)
        assert list(rows) == [s["name"] for s in specs], name
        for spec in specs:
            assert rows[spec["name"]].shape == (3, *spec["shape"][1:]), name
            assert rows[spec["name"]].dtype == np.dtype(spec["dtype"]), name
    mask = archs.inputs("transformers:bert", 8, 0)["attention_mask"]
    assert mask[0].all() and not mask.all() and (np.diff(mask, axis=1) <= 0).all()  # tail padding, one full row


def test_sweep_builder_draws_the_biases_a_model_initialises_to_zero():
    """A trained net's biases are not zero (transformers' Linears start at zero); drawn from the seed, reproducibly."""
    import torch

    archs = _script("sweep").architectures()

    def biases(model) -> dict[str, torch.Tensor]:
        return {
            name: m.bias.detach().clone()
            for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() >= 2
            and isinstance(getattr(m, "bias", None), torch.Tensor)
        }

    first, again = biases(archs.build("transformers:bert")), biases(archs.build("transformers:bert"))
    assert len(first) >= 12
    assert all(b.any() for b in first.values()), [n for n, b in first.items() if not b.any()]
    assert all(torch.equal(first[n], again[n]) for n in first)


def _row(
    name: str, ms: dict, q_float: int, q_mb: float, q_avoidable: int = 0, q_after: int = 0, q_sqnr: float = 31.0
) -> dict:
    ops = {"integer": 4, "total": 4, "float_ops": 2, "avoidable": 0}
    mine = {**ops, "float_ops": q_float, "avoidable": q_avoidable, "float_ops_after_kernels": q_after}
    return {
        "name": name,
        "quantcli": {"rc": 0, "seconds": 30.0},
        "ort": {"seconds": {"fp32_export": 10.0, "pre_process": 1.0, "quantize_static": 4.0}},
        "ops": {"quantize_static": ops, "quantcli": mine},
        "fidelity": {"share": 0.5, "quantize_static": {"sqnr_db": 30.0}, "quantcli": {"sqnr_db": q_sqnr}},
        "ms": {b: {"fp32": 2.0, "quantize_static": 1.0, "quantcli": t} for b, t in ms.items()},
        "mb": {"fp32": 4.0, "quantize_static": 1.0, "quantcli": q_mb},
        "seconds": 60.0,
    }


def test_sweep_summary_counts_each_shortfall_against_quantize_static():
    sweep = _script("sweep")
    rows = [
        _row("a", {"1": 0.9, "32": 1.0}, 2, 1.0),  # at least as good everywhere
        _row("b", {"1": 1.0, "32": 1.2}, 3, 1.5),  # slower at batch 32, one more float op (by design), larger
        _row("d", {"1": 1.0, "32": 1.0}, 4, 1.0, 1),  # two more float ops, one no rule explains
        {"name": "c", "quantcli": {"rc": 1}, "error": "quantcli exit 1: boom"},
        _row("e", {"1": 1.0, "32": 1.0}, 0, 1.0, q_after=3),  # fewer counted, more behind float-output kernels
        _row("f", {"1": 1.0, "32": 1.0}, 3, 1.0, q_sqnr=30.3),  # one more float op, and 0.3 dB for it: too little
    ]
    rows[0]["quantcli"]["ranges"] = "minmax"  # observer: auto's choice, as quantcli_run records it
    line = sweep.summary(rows)
    assert line.startswith(
        "6 models: 5 exit 0 (ORT's static flow fails on 0), 5 compared; against quantize_static: 4 within 1.03x"
    ), line
    assert "4 with more float ops between DQ and Q (1 without an SQNR 0.5 dB higher for them, 1 with more" in line
    assert "1 with a larger file" in line
    assert "0 with an SQNR over 0.5 dB lower" in line
    assert sweep.cells(rows[1])[3] == "3/2" and sweep.cells(rows[3])[2].startswith("quantcli exit 1")
    assert sweep.cells(rows[4])[3] == "0/2 (+3/+0 after float-output kernels)"
    assert sweep.cells(rows[0])[4] == "31.0/30.0 (min-max)" and sweep.cells(rows[1])[4] == "31.0/30.0"


def test_range_choice_check_counts_the_builds_each_way_keeps_the_rule_fresh_inputs_prefer(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts scripts/ on it, as when run
    check = _script("range_choice_check")

    def build(in_sample: str, out_of_sample: str, histogram: float, minmax: float) -> dict:
        fresh = {"histogram": histogram, "minmax": minmax}
        return {"in_sample": {"rule": in_sample}, "out_of_sample": {"rule": out_of_sample}, "fresh_sqnr_db": fresh}

    rows = [
        build("histogram", "minmax", 10.0, 10.5),  # out of sample right, in sample 0.5 dB short
        build("minmax", "minmax", 20.0, 21.0),  # both right
        build("histogram", "histogram", 30.0, 29.0),  # both right
    ]
    lines = check.summary(rows).splitlines()
    assert lines[0].startswith("3 builds;")
    assert [line.split() for line in lines[1:]] == [
        ["in_sample", "2", "of", "3", "0.167"],
        ["out_of_sample", "3", "of", "3", "0.000"],
        ["histogram", "1", "of", "3", "0.500"],
        ["minmax", "2", "of", "3", "0.333"],
    ]


def test_sweep_children_get_the_zoo_packages_only_where_they_need_them():
    sweep = _script("sweep")
    zoo = str(ROOT / "tests" / "zoo_site")
    for name, wanted in (("timm:resnet18", True), ("torchvision:resnet18", True), ("transformers:bert", False)):
        env = sweep.child_env(name)
        assert (zoo in env["PYTHONPATH"].split(os.pathsep)) is wanted and env["OMP_NUM_THREADS"] == "1"


class _Outputs:
    """An ONNX Runtime session's surface (`get_inputs`, `run`) answering with fixed outputs, row by row."""

    def __init__(self, outputs: np.ndarray) -> None:
        self.outputs = outputs

    def get_inputs(self):
        return [type("Input", (), {"name": "row"})()]

    def run(self, names, feed):
        return [self.outputs[feed["row"]]]


def test_bench_fidelity_reports_the_sqnr_of_the_varying_part_and_the_raw_one(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # bench imports bench_build beside it, as when run
    bench = _script("bench")
    rng = np.random.default_rng(0)
    n = 64
    fp32 = 10.0 + rng.normal(size=(n, 4))  # a constant part 100x the varying part's power
    noise = 0.1 * rng.normal(size=(n, 4))
    noise -= noise.mean(0)  # no bias: the varying part's error is all of it
    rows = {"row": np.arange(n)}
    sessions = {"fp32": _Outputs(fp32), "int8": _Outputs(fp32 + noise), "offset": _Outputs(fp32 + 1.0)}
    figures = bench.fidelity(sessions, rows, batch=16)
    centered = fp32 - fp32.mean(0)
    expected = 10 * np.log10(np.square(centered).sum() / np.square(noise).sum())
    assert figures["int8"]["sqnr_db"] == pytest.approx(expected, abs=0.01)
    assert figures["int8"]["raw_sqnr_db"] == pytest.approx(expected + 20, abs=0.3)  # the constant part counts
    assert figures["offset"]["sqnr_db"] == 200.0  # a constant offset does not vary with the input
    assert figures["offset"]["raw_sqnr_db"] == pytest.approx(20.0, abs=0.1)


def test_bench_fidelity_reports_each_rows_sqnr_which_sees_an_error_along_the_output(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    bench = _script("bench")
    rng = np.random.default_rng(1)
    n = 40
    fp32 = rng.normal(size=(n, 3)) + np.array([4.0, -4.0, 0.0])
    along = fp32.copy()
    along[7] *= 1.5  # half again as large: the same direction
    across = fp32.copy()
    across[7, :2] += [0.5, 0.5]  # a smaller error that turns the row
    graded = fp32 + np.linspace(0.01, 1.0, n)[:, None] * rng.normal(size=(n, 3))  # row i's error grows with i
    rows = {"row": np.arange(n)}
    flows = {"fp32": fp32, "along": along, "across": across, "graded": graded}
    sessions = {name: _Outputs(out) for name, out in flows.items()}
    figures = bench.fidelity(sessions, rows, 8)
    assert figures["along"]["cos_worst"] == pytest.approx(1.0)
    assert figures["along"]["row_sqnr_worst_db"] == pytest.approx(20 * np.log10(2), abs=0.01)
    expected = 10 * np.log10(np.square(fp32[7]).sum() / 0.5)
    assert figures["across"]["row_sqnr_worst_db"] == pytest.approx(expected, abs=0.01)
    assert figures["across"]["cos_worst"] < 1.0 - 1e-4 and expected > 20 * np.log10(2) + 10
    per_row = 10 * np.log10(np.square(fp32).sum(1) / np.square(graded - fp32).sum(1))
    assert figures["graded"]["row_sqnr_p5_db"] == pytest.approx(np.percentile(per_row, 5), abs=0.01)
    assert figures["graded"]["row_sqnr_worst_db"] == pytest.approx(per_row.min(), abs=0.01)


def test_sweep_variant_recipe_names_the_seed_and_observer_and_the_default_one_neither(tmp_path):
    import yaml

    sweep = _script("sweep")
    (tmp_path / "default").mkdir()
    (tmp_path / "variant").mkdir()
    default = yaml.safe_load(sweep.write_inputs("transformers:bert", tmp_path / "default", "auto").read_text())
    variant = yaml.safe_load(
        sweep.write_inputs("transformers:bert", tmp_path / "variant", "avx2", seed=3, observer="minmax").read_text()
    )
    assert default["model"]["kwargs"] == {"name": "transformers:bert"} and "quantization" not in default
    assert variant["model"]["kwargs"] == {"name": "transformers:bert", "seed": 3}
    assert variant["quantization"] == {"target_cpu": "avx2", "observer": "minmax"}
    same = [np.load(tmp_path / v / "calibration.npz")["input_ids"] for v in ("default", "variant")]
    assert (same[0] == same[1]).all()  # other weights, the same data
