"""Fail early, say why: the mistakes new users make, through the real CLI (in this process, `cli`; a new
process where that is what is tested: torch's logs held back at capture, a captured program loaded by
another process).

Each case asserts the documented exit code (never 1, the internal error), one line on stderr naming
the problem, and the stage that catches it: data problems at validate or capture (before prepare),
capture failures classified in one line with torch's logs held back. Plus the positive side: safe
casts applied everywhere and said once, a Hugging Face BERT with a bounded dynamic sequence, how
much calibration saw, and output paths.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import DIGITS, assert_fails, cli, digits_recipe, leftovers, quantcli

MODELS = textwrap.dedent("""
    import torch
    from torch import nn


    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = x.flatten(1)
            if x.sum() > 0:
                return self.fc(x)
            return self.fc(-x)


    class KeywordOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, *, x):
            return self.fc(x.flatten(1))


    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            return {"logits": y, "aux": None, "extra": (y.relu(),)}


    def branchy():
        return Branchy()


    def keyword_only():
        return KeywordOnly()


    def dict_out():
        torch.manual_seed(0)
        return DictOut().train()  # quantcli puts it in eval mode
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Models and digits data variants: float64, int32, NaN, Inf."""
    folder = tmp_path_factory.mktemp("fail-early")
    (folder / "models.py").write_text(MODELS)
    digits = dict(np.load(DIGITS / "digits.npz"))
    np.savez(
        folder / "f64.npz",
        calib_x=digits["calib_x"].astype(np.float64),
        test_x=np.rint(digits["test_x"] * 16).astype(np.int32),
        test_y=digits["test_y"],
    )
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        x = digits["calib_x"].copy()
        x[40, 0, 3, 5] = value
        np.savez(folder / f"{name}.npz", calib_x=x)
    return folder


def _recipe(folder: Path, **sections) -> Path:
    return digits_recipe(folder, **sections)


def _notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("note: ")]


# --- row 1: float64 calibration data, int32 data for a float input ---------------------------------------


@pytest.mark.slow
def test_safe_casts_are_applied_everywhere_and_said_once(files, tmp_path):
    """float64 calibration (numpy's default) and int32 evaluation data for the float input: before, export
    failed in ONNX Runtime on the uncast parity sample after four stages."""
    recipe = _recipe(
        tmp_path,
        calibration={"data": str(files / "f64.npz"), "keys": {"x": "calib_x"}},
        evaluation={"data": str(files / "f64.npz"), "keys": {"x": "test_x"}, "targets": "test_y"},
    )
    run = cli("run", "--recipe", recipe, "-o", tmp_path / "w")
    assert run.rc == 0, run.stderr
    assert _notes(run.stderr) == [  # capture, calibrate, the parity sample and evaluation read them: said once
        "note: calibration: input 'x' (array 'calib_x') is float64 in the data; cast to float32, the recipe's dtype",
        "note: evaluation: input 'x' (array 'test_x') is int32 in the data; cast to float32, the recipe's dtype",
    ]
    report = json.loads((tmp_path / "w" / "model.report.json").read_text())
    assert report["parity"]["passed"] and report["evaluation"]["samples"] == 400


# --- rows 2 and 3: a NaN (or Inf) in the calibration data --------------------------------------------------


@pytest.mark.parametrize("data, observer, kind", [("nan", "minmax", "NaN"), ("inf", "histogram", "Inf")])
def test_non_finite_calibration_data_fails_at_capture(files, tmp_path, data, observer, kind):
    """minmax used to calibrate and then fail convert with an AssertionError (exit 1); histogram failed
    with torch.histc's message. Capture reads the calibration data first, before anything is built."""
    recipe = _recipe(
        tmp_path,
        calibration={"data": str(files / f"{data}.npz"), "keys": {"x": "calib_x"}},
        quantization={"target": "onnxruntime", "observer": observer},
    )
    work = tmp_path / "new" / "nested" / "w"  # a failed command leaves no folder it created
    line = assert_fails(cli("run", "--recipe", recipe, "-o", work), 3)
    assert line == (
        f"error: calibration batch 1: input 'x' (array 'calib_x') holds {kind} at sample 40 of the data "
        "(quantization ranges need finite values: fix or drop that sample)"
    )
    assert not (tmp_path / "new").exists()


# --- row 4: evaluation.targets names an array the file lacks -----------------------------------------------


def test_a_missing_targets_array_fails_validate_and_run_before_any_stage(tmp_path):
    recipe = _recipe(tmp_path, evaluation={"data": str(DIGITS / "digits.npz"), "keys": {"x": "test_x"}, "targets": "y"})
    expected = (
        "evaluation: no array 'y' in the data; it has ['calib_x', 'calib_y', 'test_x', 'test_y', 'train_x', "
        "'train_y'] (for the targets, evaluation.targets)"
    )
    assert_fails(cli("validate", recipe), 3, f"{recipe}: {expected}")
    assert_fails(cli("run", "--recipe", recipe, "-o", tmp_path / "w"), 3, expected)
    assert not (tmp_path / "w").exists()


# --- rows 5 and 6: forward() that torch.export cannot capture ---------------------------------------------


def test_data_dependent_control_flow_is_one_line_naming_the_forward_line(files, tmp_path):
    recipe = _recipe(tmp_path, model={"factory": f"{files / 'models.py'}:branchy"})
    run = quantcli("capture", "--recipe", recipe, "-o", tmp_path / "captured")
    line = assert_fails(run, 3)  # exactly one line: torch's logs and graph dumps are held back
    number = next(i for i, text in enumerate(MODELS.splitlines(), 1) if "if x.sum() > 0:" in text)
    assert line == (
        f"error: capture failed: forward() at {files / 'models.py'}:{number} depends on tensor values "
        "(`if x.sum() > 0:`), which torch.export cannot capture (torch.export records one graph for "
        "every input: use torch.cond for a branch on tensor values, or a static alternative such as "
        "torch.where; --debug shows torch's message)"
    )
    assert "check the recipe's inputs" not in line
    assert not (tmp_path / "captured").exists() and leftovers(tmp_path) == []


def test_a_keyword_only_forward_is_refused_before_it_is_called(files, tmp_path):
    recipe = _recipe(tmp_path, model={"factory": f"{files / 'models.py'}:keyword_only"})
    assert_fails(
        cli("capture", "--recipe", recipe, "-o", tmp_path / "captured"),
        3,
        "capture failed: forward() takes keyword-only argument(s) 'x', but quantcli passes the recipe's "
        "inputs (x) positionally, in order (give forward() one positional parameter per recipe input",
    )


# --- row 7: a Hugging Face BERT with a dynamic sequence -----------------------------------------------------

HF_FACTORY = textwrap.dedent('''
    import torch
    from transformers import BertConfig, BertModel


    def build():
        """A tiny BertModel (random weights, train mode: quantcli calls .eval()); returns a ModelOutput."""
        config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64)
        torch.manual_seed(0)
        return BertModel(config)
''')


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    """A folder with the BERT factory and calibration data named after the inputs (no `keys`)."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf-bert")
    (folder / "bert.py").write_text(HF_FACTORY)
    rng = np.random.default_rng(0)
    mask = np.ones((32, 16), np.int64)
    mask[1::2, 11:] = 0
    np.savez(folder / "text.npz", input_ids=rng.integers(0, 128, (32, 16)), attention_mask=mask)
    return folder


def _hf_recipe(folder: Path, seq) -> Path:
    inputs = [
        {"name": name, "shape": [8, 16], "dtype": "int64", "dynamic_axes": {0: "batch", 1: seq}}
        for name in ("input_ids", "attention_mask")
    ]
    recipe = {
        "model": {"factory": "bert.py:build"},
        "inputs": inputs,
        "calibration": {"data": "text.npz", "batch_size": 8},
    }
    path = folder / f"bert-{'bounded' if isinstance(seq, dict) else 'free'}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_an_unbounded_sequence_axis_says_how_to_bound_it(hf, tmp_path):
    line = assert_fails(cli("capture", "--recipe", _hf_recipe(hf, "seq"), "-o", tmp_path / "captured"), 2)
    assert line == (
        "error: capture failed: the model does not accept every size of dynamic axis 'seq' (input_ids "
        "axis 1, attention_mask axis 1): torch suggests seq = Dim('seq', max=64) (bound it in the "
        "recipe's dynamic_axes: input_ids {1: {name: seq, max: 64}}, attention_mask {1: {name: seq, "
        "max: 64}})"
    )


@pytest.mark.slow
def test_a_bert_with_a_bounded_sequence_exports_and_runs_at_three_lengths(hf, tmp_path):
    import onnxruntime as ort
    import torch

    from quantcli.numerics.parity import sqnr_db

    recipe = _hf_recipe(hf, {"name": "seq", "min": 1, "max": 64})
    work = tmp_path / "w"
    run = cli("run", "--recipe", recipe, "-o", work)
    assert run.rc == 0, run.stderr
    # another process loads the captured program: the ModelOutput was flattened while capturing
    shown = quantcli("inspect", work / "calibrated")
    assert shown.rc == 0 and "  calibration: 4 batches, 32 samples" in shown.stdout.splitlines(), shown.stderr
    onnx_shown = cli("inspect", work / "model.onnx")
    assert onnx_shown.rc == 0, onnx_shown.stderr
    lines = onnx_shown.stdout.splitlines()
    assert {
        "  input input_ids: int64 [batch, seq]",
        "  input attention_mask: int64 [batch, seq]",
        "  output last_hidden_state: float32 [batch, seq, 64]",
        "  output pooler_output: float32 [batch, 64]",
    } <= set(lines)
    assert any(line.startswith("  SQNR vs fp32: last_hidden_state ") and "pooler_output" in line for line in lines)

    sys.path.insert(0, str(hf))
    try:
        import bert
    finally:
        sys.path.remove(str(hf))
    model = bert.build().eval()
    session = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for length in (3, 16, 64):
        ids = rng.integers(0, 128, (2, length))
        mask = np.ones((2, length), np.int64)
        mask[1, length // 2 + 1 :] = 0
        hidden, pooled = session.run(None, {"input_ids": ids, "attention_mask": mask})
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        assert hidden.shape == (2, length, 64) and pooled.shape == (2, 64)
        assert sqnr_db(ref.last_hidden_state.numpy(), hidden) > 30, length
        assert sqnr_db(ref.pooler_output.numpy(), pooled) > 25, length


# --- row 8: how much calibration saw -----------------------------------------------------------------------


def test_more_batches_than_exist_is_said_and_the_work_is_recorded(work, tmp_path):
    out = tmp_path / "calibrated"
    run = cli("calibrate", work / "prepared", "-o", out, "--batches", "100")
    assert run.rc == 0, run.stderr
    assert run.stderr.splitlines()[0] == (
        "note: calibration: 100 batches asked for, the data holds 7 (200 samples at batch_size 32): using 7"
    )
    assert run.stderr.splitlines()[1].endswith("s (7 batches, 200 samples)")
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["batches"], manifest["samples"]) == (7, 200)


# --- row 9 and unwritable outputs -----------------------------------------------------------------------


def test_an_output_name_near_the_limit_and_none_outputs(files, tmp_path):
    """A 250-character name under folders that do not exist yet: the hidden temporary sibling is
    shortened, so the name the user chose works. The model's None output is dropped and its nested
    output gets a dotted name."""
    recipe = _recipe(tmp_path, model={"factory": f"{files / 'models.py'}:dict_out"}, outputs=None)
    out = tmp_path / "a" / "b" / ("c" * 250)
    run = cli("capture", "--recipe", recipe, "-o", out)
    assert run.rc == 0, run.stderr
    assert os.listdir(out.parent) == [out.name]
    assert json.loads((out / "manifest.json").read_text())["io"]["outputs"] == ["logits", "extra.0"]


def test_an_export_whose_report_name_would_be_too_long_is_refused_before_any_work(work, tmp_path):
    out = tmp_path / ("m" * 246 + ".onnx")  # legal, but <name>.report.json is 258 bytes
    assert_fails(
        cli("export", work / "converted", "-o", out),
        4,
        f"cannot write {out}: its report's name is 258 bytes, over the file-name limit of 255",
    )
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs, unwritable even for root")
@pytest.mark.parametrize("command, src, name", [("export", "converted", "model.onnx"), ("prepare", "captured", "p")])
def test_an_unwritable_output_is_exit_4_whichever_stage_finds_it(work, command, src, name):
    out = Path("/sys/kernel") / f"quantcli-{os.getpid()}-{name}"
    assert_fails(cli(command, work / src, "-o", out), 4, f"cannot write {out}: ")
    assert not out.exists()


# --- torch's real messages, classified in-process ------------------------------------------------------


def test_other_constraint_violations_carry_torchs_fix_in_recipe_terms():
    import torch

    from quantcli import _torch, diagnose
    from quantcli.recipe import InputSpec

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.reshape(4, 8) * 2

    class Equal(torch.nn.Module):
        def forward(self, x, y):
            return x + y

    x = InputSpec(name="x", shape=[4, 8])
    y = InputSpec(name="y", shape=[4, 8], dynamic_axes={0: "other"})
    cases = [
        (
            Fixed(),
            [x],
            "torch suggests batch = 4 (the model fixes batch to 4: make x axis 0 static (drop it from dynamic_axes))",
        ),
        (
            Equal(),
            [x, y],
            "torch suggests other = batch (other must equal batch: name y axis 0 'batch' in dynamic_axes)",
        ),
    ]
    for model, inputs, expected in cases:
        args = tuple(torch.randn(4, 8) for _ in inputs)
        from quantcli.loading.inputs import dynamic_shapes

        with pytest.raises(Exception) as info:
            _torch.export_program(model, args, dynamic_shapes(inputs))
        error = diagnose.capture_error(info.value, _torch.export_failure(info.value), inputs)
        assert error.exit_code == 2 and error.line().endswith(expected), error.line()


def test_the_factorys_module_is_put_in_eval_mode(files):
    from quantcli.recipe import Recipe
    from quantcli.sources.build import build_model

    recipe = Recipe(model={"factory": f"{files / 'models.py'}:dict_out"}, inputs=[{"name": "x", "shape": [1, 4]}])
    assert build_model(recipe).module.training is False
