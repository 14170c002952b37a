"""Quantization-aware training: prepare --qat, train (freezes, checkpoints, resume, errors), the Python
API, convert folding BN into the trained model, and the digits example end to end."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from filelock import FileLock

from quantcli import _torch, artifacts, stages, training
from quantcli.errors import ArtifactError, DataError, RecipeError
from quantcli.stages.base import restore_prepared
from quantcli.training import checkpoints
from tests.conftest import assert_fails, cli, cli_env, leftovers, quantcli, session_dir
from tests.tolerances import QAT_OWN_LOOP_SQNR_DB

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits"
BN_OPS = {
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
}


# ------------------------------------------------------------------ shared work
@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The first 256 training digits (8 steps an epoch at batch 32), and labels out of range."""
    shared = session_dir(tmp_path_factory, worker_id)
    path = shared / "qat-small.npz"
    with FileLock(str(shared / "qat-small.lock")):
        if not path.exists():
            digits = np.load(DIGITS / "digits.npz")
            x, y = digits["train_x"][:256], digits["train_y"][:256]
            np.savez(shared / "qat-small.tmp.npz", x=x, y=y, y_plus_10=y + 10)
            os.replace(shared / "qat-small.tmp.npz", path)
    return path


@contextlib.contextmanager
def one_thread():
    """Train in-process as a CLI test process does (OMP_NUM_THREADS=1), so results compare bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def training_recipe(folder: Path, data: Path, **training: object) -> Path:
    """configs/digits/qat.yaml (absolute paths) with a small training: section, `training` overriding it."""
    recipe = yaml.safe_load((DIGITS / "qat.yaml").read_text())
    recipe["model"]["factory"] = f"{DIGITS / 'model.py'}:build"
    for section in ("calibration", "evaluation"):
        recipe[section]["data"] = str(DIGITS / "digits.npz")
    recipe["training"] = {
        "data": str(data),
        "keys": {"x": "x"},
        "targets": "y",
        "batch_size": 32,
        "epochs": 2,
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "freeze_bn_after": 0.5,
        "freeze_observers_after": 0.75,
        "checkpoint_every": 4,
        "seed": 3,
        **training,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "qat.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def digits_test_split() -> tuple[torch.Tensor, np.ndarray]:
    digits = np.load(DIGITS / "digits.npz")
    return torch.from_numpy(digits["test_x"]), digits["test_y"]


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / artifacts.STATE, weights_only=True)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def sqnr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).mean() / (reference - other).pow(2).mean().clamp_min(1e-30)))


def bn_training_flags(module) -> list[bool]:
    return [
        n.args[5]
        for n in module.graph.nodes
        if n.op == "call_function"
        and n.target in BN_OPS
        and n.target is not torch.ops.aten._native_batch_norm_legit_no_training.default
    ]


def open_stage(path: Path):
    return artifacts.open_artifact(path, (json.loads((path / "manifest.json").read_text())["stage"],), "test")


# ------------------------------------------------------------------ the example, end to end
def test_digits_qat_keeps_fp32_accuracy_and_is_no_worse_than_ptq(qat_work, work):
    """The acceptance numbers: QAT int8 >= PTQ int8 (the shared PTQ chain) and within 0.5 points of fp32."""
    qat = json.loads((qat_work / "model.report.json").read_text())
    ptq = json.loads((work / "model.report.json").read_text())["evaluation"]
    ev = qat["evaluation"]
    assert ev["fp32_torch"] == ptq["fp32_torch"]  # the same model and test split
    assert ev["int8_onnx"] >= ptq["int8_onnx"]
    assert ev["int8_onnx"] >= ev["fp32_torch"] - 0.005
    assert qat["parity"]["passed"]  # ORT matches the converted module
    assert sorted(p.name for p in qat_work.iterdir()) == [
        "calibrated",
        "captured",
        "converted",
        "model.onnx",
        "model.report.json",
        "prepared",
        "trained",
    ]
    ops = {n.op_type for n in onnx.load(str(qat_work / "model.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "Conv" in ops
    assert not {op for op in ops if "BatchNorm" in op or "FakeQuant" in op}


def test_prepare_qat_fuses_conv_bn_for_training_with_plain_fake_quantize(qat_work):
    prepared = restore_prepared(open_stage(qat_work / "prepared"))
    convs = [n for n in prepared.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(convs) == 6 and len(bn_training_flags(prepared)) == 6
    for conv in convs:  # fused: the conv sees fake_quant(weight * bn_weight / sqrt(running_var + eps))
        fq = conv.args[1]
        assert fq.op == "call_module" and fq.args[0].target == torch.ops.aten.mul.Tensor
    kinds = {type(m).__name__ for m in _torch.fake_quantizers(prepared)}
    assert kinds == {"FakeQuantize"}  # not the fused one, whose weight scales differ from convert's


class ConvFamilies(torch.nn.Module):
    """conv1d + BN1d and conv_transpose2d + BN2d, the other conv types QAT fuses."""

    def __init__(self):
        super().__init__()
        self.conv1d, self.bn1d = torch.nn.Conv1d(4, 8, 3, padding=1, bias=False), torch.nn.BatchNorm1d(8)
        self.deconv, self.bn2d = torch.nn.ConvTranspose2d(8, 4, 2, stride=2), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn1d(self.conv1d(x)))  # [B, 8, 16]
        return torch.relu(self.bn2d(self.deconv(y.reshape(-1, 8, 4, 4))))


@pytest.mark.slow
def test_conv1d_and_conv_transpose_are_fused_for_training_and_folded_by_convert(patterns_as_torchao_traces):
    """Every pattern torchao traces on the way (conv-bn fuse and fold, train/eval switches) is also traced as
    torchao traces it: the same graphs."""
    from quantcli import quantizers
    from quantcli.recipe import QuantizationSection

    torch.manual_seed(0)
    model = ConvFamilies().eval()
    x = torch.randn(8, 4, 16)
    program = _torch.export_program(model, (x,), ({0: torch.export.Dim("batch")},))
    quantizer = quantizers.build(quantizers.resolve(QuantizationSection()), qat=True)
    prepared = _torch.prepare(program.module(), quantizer, True)
    assert len(bn_training_flags(prepared)) == 2
    for target in (torch.ops.aten.conv1d.default, torch.ops.aten.conv_transpose2d.input):
        conv = next(n for n in prepared.graph.nodes if n.target == target)
        assert conv.args[1].op == "call_module" and conv.args[1].args[0].target == torch.ops.aten.mul.Tensor
    _torch.to_train(prepared)
    prepared(x)  # observe
    _torch.to_eval(_torch.disable_observers(prepared))
    with torch.no_grad():
        expected = prepared(x)
    converted = _torch.convert(prepared, fold_quantize=True)
    assert not [n for n in converted.graph.nodes if n.target in BN_OPS]
    with torch.no_grad():
        assert sqnr_db(expected, converted(x)) > 40
    assert len(patterns_as_torchao_traces) >= 4  # fuse, fold, train and eval patterns


def _scaled_conv(factor):
    """A pattern as torchao writes one: a closure in its module wrapper (`factor` a number or a tensor)."""
    from torchao.quantization.pt2e.export_utils import WrapperModule

    def pattern(x, weight):
        return torch.nn.functional.conv2d(x, weight) * factor

    return WrapperModule(pattern)


def test_torchao_patterns_are_traced_once_a_process_and_each_caller_gets_a_copy(monkeypatch):
    """torchao traces its QAT and train/eval patterns with torch.export on every pass; within
    `_traced_patterns_cached` a pattern is traced once per function, closure values and input shapes."""
    from torchao.quantization.pt2e import utils

    traced = []
    trace, torchaos = _torch._trace_pattern, utils._get_aten_graph_module_for_pattern

    def counting(pattern, *args, **kwargs):
        traced.append(pattern)
        return trace(pattern, *args, **kwargs)

    monkeypatch.setattr(_torch, "_trace_pattern", counting)
    monkeypatch.setattr(_torch, "_TRACED_PATTERNS", {})
    small = (torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1))
    large = (torch.randn(1, 2, 5, 5), torch.randn(2, 2, 1, 1))
    with _torch._traced_patterns_cached():
        first = utils._get_aten_graph_module_for_pattern(_scaled_conv(2.0), small)
        again = utils._get_aten_graph_module_for_pattern(_scaled_conv(2.0), small)  # a new closure, the same values
        assert len(traced) == 1 and again is not first and again.code == first.code
        other = utils._get_aten_graph_module_for_pattern(_scaled_conv(3.0), small)
        wider = utils._get_aten_graph_module_for_pattern(_scaled_conv(2.0), large)
        assert len(traced) == 3 and "3.0" in other.code and "2.0" in first.code
        # a tensor the function holds is a constant of its trace: no two such patterns share one
        two, three = (
            utils._get_aten_graph_module_for_pattern(_scaled_conv(torch.tensor(f)), small) for f in (2.0, 3.0)
        )
        assert len(traced) == 5
    x, weight = small
    assert torch.equal(first(x, weight), torch.nn.functional.conv2d(x, weight) * 2.0)
    assert torch.equal(three(x, weight), torch.nn.functional.conv2d(x, weight) * 3.0) and torch.equal(
        two(x, weight), first(x, weight)
    )
    assert torch.equal(wider(*large), torch.nn.functional.conv2d(*large) * 2.0)
    assert utils._get_aten_graph_module_for_pattern is torchaos  # put back after the block


# ------------------------------------------------------------------ train: state, convert, reload
def test_trained_artifact_records_frozen_observers_and_bn(qat_work):
    trained = open_stage(qat_work / "trained")
    assert trained.manifest["observers_frozen"] and trained.manifest["bn_frozen"] and trained.manifest["steps"] == 36
    assert not (qat_work / ".trained.partial").exists()  # checkpoints go once the output is committed
    module = restore_prepared(trained)
    assert _torch.observers_frozen(module)
    assert_same_state(module.state_dict(), load_state(trained.path))  # eps included (observer versions kept)
    model = training.load(qat_work / "trained").train()
    assert bn_training_flags(model.prepared) == [False] * 6  # the freeze is graph state, re-applied
    assert bn_training_flags(model.eval().train().prepared) == [False] * 6  # and survives eval -> train


def test_converted_model_matches_the_trained_fake_quant_model(qat_work):
    x, y = digits_test_split()
    trained = restore_prepared(open_stage(qat_work / "trained"))
    converted = _torch.load_program(qat_work / "converted" / artifacts.PROGRAM)
    manifest_ops = open_stage(qat_work / "converted").manifest["ops"]
    assert not [op for op in manifest_ops if "batch_norm" in op or "fake_quant" in op]
    assert not [n for n in converted.graph_module.graph.nodes if "batch_norm" in str(n.target)]
    with torch.no_grad():
        a, b = trained(x), converted.module()(x)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert sqnr_db(a, b) > 60  # float rounding of the folded weights only (the fused fake quant: ~20 dB)


RELOAD = """
import sys, numpy as np, torch
from quantcli import training
model = training.load(sys.argv[1])
with torch.no_grad():
    np.save(sys.argv[3], model(torch.from_numpy(np.load(sys.argv[2]))).numpy())
"""


@pytest.mark.slow
def test_trained_artifact_reloads_bit_identically_in_a_new_process(qat_work, tmp_path):
    x, _ = digits_test_split()
    np.save(tmp_path / "x.npy", x.numpy())
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(qat_work / "trained"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True,
        cwd=ROOT,
        env=cli_env(),
    )
    with torch.no_grad():
        here = training.load(qat_work / "trained")(x).numpy()
    assert np.array_equal(here, np.load(tmp_path / "y.npy"))


# ------------------------------------------------------------------ the Python API
@pytest.mark.slow
def test_qat_module_switches_modes_and_freezes(qat_work):
    model = training.load(qat_work / "calibrated")
    assert not model.training and bn_training_flags(model.prepared) == [False] * 6
    x = digits_test_split()[0][:64]
    bn = _torch.bn_buffers(model.prepared)[0]
    before = bn.clone()
    model.train()
    assert bn_training_flags(model.prepared) == [True] * 6
    model(x)
    assert not torch.equal(bn, before)  # live BN updates its running stats in training
    model.freeze_bn()
    frozen = bn.clone()
    model(x * 2)
    model.eval().train()
    model(x * 2)
    assert torch.equal(bn, frozen)
    fqs = _torch.fake_quantizers(model.prepared)
    before = [fq.scale.clone() for fq in fqs]
    model.eval()(x * 10)  # observers update in eval mode too, until frozen
    live = [fq.scale.clone() for fq in fqs]
    assert any(not torch.equal(a, b) for a, b in zip(before, live))
    model.freeze_observers()
    model.train()(x * 100)
    model.eval()(x * 100)
    assert all(torch.equal(fq.scale, s) for fq, s in zip(fqs, live)) and model.observers_frozen


@pytest.mark.slow
def test_own_loop_saves_a_trained_artifact_that_converts_to_the_same_model(qat_work, tmp_path):
    digits = np.load(DIGITS / "digits.npz")
    model = training.load(qat_work / "calibrated").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for start in range(0, 96, 32):
        x = torch.from_numpy(digits["train_x"][start : start + 32])
        loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(digits["train_y"][start : start + 32]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.freeze_bn()
    result = training.save(model, tmp_path / "trained")
    assert result.manifest["stage"] == "trained" and result.manifest["observers_frozen"]
    assert training.save(model, tmp_path / "trained").reused  # same state, same key
    converted = stages.convert.run(tmp_path / "trained", tmp_path / "converted")
    assert not [op for op in converted.manifest["ops"] if "batch_norm" in op]
    x, _ = digits_test_split()
    with torch.no_grad():
        a = model.eval()(x)
        b = _torch.load_program(tmp_path / "converted" / artifacts.PROGRAM).module()(x)
    # Where the target's weights are pair-safe, convert lowers those the last step pushed over a pair's limit,
    # which the frozen ranges never saw (quantizers.pair_safety): the floor is the resolved target's.
    quantization = converted.manifest["recipe"]["quantization"]
    lowered = converted.manifest["pair_safe_weights_lowered"]
    assert (lowered > 0) == (quantization["reduce_range"] == "pair_safe")  # measured 14 at avx2
    target = quantization["target_cpu"]
    assert torch.equal(a.argmax(-1), b.argmax(-1)) and sqnr_db(a, b) > QAT_OWN_LOOP_SQNR_DB[target]


# ------------------------------------------------------------------ checkpoints and resume
STOPPING_LOSS = """
import os, signal
import torch.nn.functional as F

calls = 0


def loss(output, targets):
    global calls
    calls += 1
    if calls == int(os.environ.get("STOP_AT_CALL", "0")):
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler's kill does, between two checkpoints
    return F.cross_entropy(output, targets)
"""


@pytest.fixture(scope="session")
def resume_case(tmp_path_factory, worker_id, qat_work, small_data) -> tuple[Path, Path]:
    """A 16-step training recipe (checkpoints after 4, 8, 12) whose loss SIGTERMs its process at call
    $STOP_AT_CALL, and its uninterrupted run."""
    folder = session_dir(tmp_path_factory, worker_id) / "qat-resume"
    with FileLock(str(folder.parent / "qat-resume.lock")):
        if not (folder / "full" / artifacts.MANIFEST).exists():
            folder.mkdir(exist_ok=True)
            (folder / "stopping_loss.py").write_text(STOPPING_LOSS)
            recipe = training_recipe(folder, small_data, loss=f"{folder / 'stopping_loss.py'}:loss")
            with one_thread():
                stages.train.run(qat_work / "calibrated", folder / "full", recipe_path=recipe)
    return folder / "qat.yaml", folder / "full"


class Interrupt:
    """A progress callback that raises KeyboardInterrupt (what the CLI makes of SIGTERM) after `step`."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, done: int, total: int | None, metrics: dict) -> None:
        if done == self.step and metrics:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_resume_after_an_interrupt_ends_with_the_uninterrupted_model(qat_work, resume_case, small_data, tmp_path):
    recipe, full = resume_case
    src, out, partial = qat_work / "calibrated", tmp_path / "resumed", tmp_path / ".resumed.partial"
    with one_thread(), pytest.raises(KeyboardInterrupt):
        stages.train.run(src, out, recipe_path=recipe, progress=Interrupt(14))
    assert not out.exists() and not leftovers(tmp_path)
    assert sorted(p.name for p in partial.iterdir()) == [artifacts.CHECKPOINT]
    assert not artifacts.is_artifact(partial)
    checkpoint = torch.load(partial / artifacts.CHECKPOINT, weights_only=True)
    # BN froze at step 8, observers freeze at 12, after this checkpoint: the resumed run must do it
    assert checkpoint["step"] == 12 and checkpoint["bn_frozen"] and not checkpoint["observers_frozen"]
    other = training_recipe(tmp_path / "other", small_data, seed=4)
    with pytest.raises(ArtifactError, match="another run"):  # a changed recipe cannot resume it
        stages.train.run(src, out, recipe_path=other, resume=True)
    with one_thread():
        resumed = stages.train.run(src, out, recipe_path=recipe, resume=True)
    assert resumed.details["resumed_from_step"] == 12 and not partial.exists()
    assert resumed.manifest["key"] == open_stage(full).manifest["key"]
    assert_same_state(load_state(full), load_state(out))
    assert_not_trivial(load_state(src), load_state(out))


def assert_not_trivial(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """Training changed the weights, BN statistics and observer ranges (so equality means something)."""
    for suffix in ("0.0.weight", "running_mean", "activation_post_process.max_val"):
        names = [k for k in before if k.endswith(suffix)]
        assert names and any(not torch.equal(before[k], after[k]) for k in names), suffix


@pytest.mark.slow
def test_cli_sigterm_keeps_the_checkpoint_and_resume_matches_an_uninterrupted_run(qat_work, resume_case, tmp_path):
    recipe, full = resume_case
    src, out = qat_work / "calibrated", tmp_path / "trained"
    killed = quantcli("train", src, "-o", out, "--recipe", recipe, env=cli_env(STOP_AT_CALL="7"))
    assert_fails(killed, 130, "interrupted")
    assert not out.exists() and not leftovers(tmp_path)
    assert (tmp_path / ".trained.partial" / artifacts.CHECKPOINT).is_file()
    with one_thread():  # the killed training was the process; the resumed one compares bit for bit with `full`
        resumed = cli("train", src, "-o", out, "--recipe", recipe, "--resume", "--json")
    assert resumed.rc == 0, resumed.stderr
    assert resumed.json()["resumed_from_step"] == 4 and not (tmp_path / ".trained.partial").exists()
    assert_same_state(load_state(full), load_state(out))


def test_run_after_an_interrupted_qat_keeps_the_checkpoint_says_so_and_resumes(tmp_path):
    """The bundled QAT recipe through `quantcli run`: an interrupt names the checkpoint it kept, a rerun without
    --resume refuses to throw it away, `run --resume` continues from it."""
    from tests.conftest import DIGITS

    doc = yaml.safe_load((DIGITS / "qat.yaml").read_text())
    (tmp_path / "stopping_loss.py").write_text(STOPPING_LOSS)
    doc["model"]["factory"] = str(DIGITS / "model.py:build")
    doc["model"]["kwargs"]["checkpoint"] = str(DIGITS / "net.pt")
    for section in ("calibration", "training", "evaluation"):
        doc[section]["data"] = str(DIGITS / "digits.npz")
    doc["training"]["loss"] = f"{tmp_path / 'stopping_loss.py'}:loss"
    recipe, work = tmp_path / "qat.yaml", tmp_path / "work"
    recipe.write_text(yaml.safe_dump(doc))
    partial = work / ".trained.partial"
    killed = quantcli("run", "--recipe", recipe, "-o", work, env=cli_env(STOP_AT_CALL="15"))
    assert_fails(killed, 130, f"interrupted; the training checkpoint is kept in {partial}", "--resume")
    assert (partial / artifacts.CHECKPOINT).is_file() and not (work / "trained").exists()
    saved = (partial / artifacts.CHECKPOINT).read_bytes()
    again = cli("run", "--recipe", recipe, "-o", work)  # only the interrupted run needs a process of its own
    assert_fails(again, 4, f"{partial} holds the checkpoint of an interrupted training", "--resume", "--force")
    assert (partial / artifacts.CHECKPOINT).read_bytes() == saved
    resumed = cli("run", "--recipe", recipe, "-o", work, "--resume", "--json")
    assert resumed.rc == 0, resumed.stderr
    train = next(s for s in resumed.json()["stages"] if s["stage"] == "trained")
    assert train["resumed_from_step"] == 10 and not partial.exists() and (work / "model.onnx").is_file()


# ------------------------------------------------------------------ bad training sections
BAD = {  # training: update -> error class, CLI exit code, message fragment, also run through the CLI
    "missing targets array": ({"targets": "labels"}, DataError, 3, "no array 'labels'", False),
    "unknown loss": ({"loss": "hinge"}, RecipeError, 2, "unknown loss 'hinge'", True),
    "targets of the wrong shape": ({"loss": "mse"}, DataError, 3, "mse needs the output's shape [32, 10]", True),
    "float targets of another shape": (
        {"targets": "x"},
        DataError,
        3,
        "cross_entropy needs probabilities of shape",
        False,
    ),
    "class index out of range": ({"targets": "y_plus_10"}, DataError, 3, "class indices in [0, 10)", False),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_training_section_is_one_clear_error(qat_work, small_data, tmp_path, case):
    training_update, error, code, fragment, through_cli = BAD[case]
    recipe = training_recipe(tmp_path, small_data, **training_update)
    out = tmp_path / "trained"
    with pytest.raises(error, match=re.escape(fragment)):
        stages.train.run(qat_work / "calibrated", out, recipe_path=recipe)
    if through_cli:
        assert_fails(cli("train", qat_work / "calibrated", "-o", out, "--recipe", recipe), code, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat.yaml"]  # no output, no checkpoint, no temp


def test_train_refuses_a_ptq_artifact_and_a_recipe_without_training(work, qat_work, tmp_path):
    with pytest.raises(ArtifactError, match="prepared for post-training quantization") as refused:
        stages.train.run(work / "calibrated", tmp_path / "t")
    assert "--qat" in refused.value.line()
    with pytest.raises(RecipeError, match="training: missing"):
        stages.train.run(qat_work / "prepared", tmp_path / "t", recipe_path=DIGITS / "recipe.yaml")
    assert not list(tmp_path.iterdir())


def test_observers_frozen_at_step_0_need_calibration_first(qat_work, small_data, tmp_path):
    recipe = training_recipe(tmp_path, small_data, freeze_observers_after=0)
    with pytest.raises(RecipeError, match="before they see any data"):
        stages.train.run(qat_work / "prepared", tmp_path / "t", recipe_path=recipe)
    assert not checkpoints.partial_dir(tmp_path / "t").exists()  # refused before any checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat.yaml"]
    assert not os.path.exists(tmp_path / "t")
