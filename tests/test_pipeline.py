"""The library API's stages: outputs, weights, restoring state in a new process, data sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from quantcli import artifacts, stages
from tests.models import example_batch
from tests.recipes import write_recipe

ROOT = Path(__file__).resolve().parents[1]


def prepared(folder: Path, name: str, **sections) -> Path:
    """capture and prepare MODELS[name] into folder/w; returns the work folder."""
    w = folder / "w"
    stages.capture.run(write_recipe(folder, name, **sections), w / "captured")
    stages.prepare.run(w / "captured", w / "prepared")
    return w


def calibrated(folder: Path, name: str, **sections) -> Path:
    w = prepared(folder, name, **sections)
    stages.calibrate.run(w / "prepared", w / "calibrated")
    return w


def run_chain(folder: Path, name: str, **sections) -> tuple[Path, dict]:
    w = calibrated(folder, name, **sections)
    stages.convert.run(w / "calibrated", w / "converted")
    result = stages.export.run(w / "converted", w / "model.onnx")
    return w, result.details["report"]


@pytest.mark.slow
def test_two_outputs_are_named_after_dict_keys(chained):
    model = onnx.load(str(chained("two_io") / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["logits", "embedding"]


@pytest.mark.slow
def test_recipe_output_names_are_used(tmp_path):
    w, _ = run_chain(tmp_path, "two_io", outputs=["scores", "vector"])
    assert [o.name for o in onnx.load(str(w / "model.onnx")).graph.output] == ["scores", "vector"]


def test_converted_program_keeps_only_int8_weights(chained):
    from quantcli import _torch

    program = _torch.load_program(chained("mlp") / "converted" / artifacts.PROGRAM)
    weights = {k: v for k, v in program.state_dict.items()} | dict(program.constants)
    matrices = [v for v in weights.values() if getattr(v, "ndim", 0) == 2]
    assert matrices and all(str(v.dtype) == "torch.int8" for v in matrices)


def test_a_program_loaded_again_is_a_copy_of_the_first_and_a_changed_file_is_read_anew(chained, tmp_path, monkeypatch):
    """`quantcli run` reads the captured program in four stages: after the first load of a file, a process gets
    deep copies (its own tensors: training writes into them), and a file written since is loaded from disk."""
    import shutil

    import torch

    from quantcli import _torch

    path = tmp_path / "program.pt2"
    shutil.copy(chained("mlp") / "captured" / artifacts.PROGRAM, path)
    reads = []
    load = torch.export.load
    monkeypatch.setattr(torch.export, "load", lambda f: reads.append(f) or load(f))
    first, second = _torch.load_program(path), _torch.load_program(path)
    assert len(reads) == 1 and first is not second
    name, weight = next(iter(first.state_dict.items()))
    assert torch.equal(weight, second.state_dict[name])
    with torch.no_grad():
        weight.add_(1.0)  # a caller writing into its copy
    third = _torch.load_program(path)
    assert not torch.equal(third.state_dict[name], weight) and torch.equal(
        third.state_dict[name], second.state_dict[name]
    )
    shutil.copy(chained("mlp") / "converted" / artifacts.PROGRAM, path)  # another program written over it
    assert str(_torch.load_program(path).graph) != str(first.graph) and len(reads) == 2
    _torch.save_program(first, path)  # a program saved is read back from the file, as a new process reads it
    fourth = _torch.load_program(path)
    assert len(reads) == 3 and torch.equal(fourth.state_dict[name], weight)


def test_a_program_saves_to_torchs_bytes_without_the_canonical_copy_torch_discards(chained, tmp_path, monkeypatch):
    import torch
    from torch._export.serde import serialize

    from quantcli import _torch

    program = _torch.load_program(chained("two_io") / "converted" / artifacts.PROGRAM)
    canonical = []
    canonicalize = serialize.canonicalize
    monkeypatch.setattr(serialize, "canonicalize", lambda *a, **k: canonical.append(1) or canonicalize(*a, **k))
    counting = serialize.canonicalize
    ours, torchs = tmp_path / "quantcli" / "program.pt2", tmp_path / "torch" / "program.pt2"  # the archive: its stem
    ours.parent.mkdir(), torchs.parent.mkdir()
    _torch.save_program(program, ours)
    assert canonical == [] and serialize.canonicalize is counting  # left out for the save, put back after
    torch.export.save(program, str(torchs))  # torch's own save, its check included
    assert canonical == [1] and ours.read_bytes() == torchs.read_bytes()


@pytest.mark.parametrize("name", ["two_io", "bert"])
def test_a_program_loads_the_same_with_the_deserializers_type_hints_and_parses_kept(name, chained, monkeypatch):
    """The load keeps each schema class's type hints and each shape text's parse for its own duration: the same
    program as torch's own deserializer gives (symbolic sizes included), and torch's serializer module has its
    `typing` and `sympy` back after."""
    import contextlib
    import typing

    import sympy
    import torch
    from torch._export.serde import serialize

    from quantcli import _torch

    path = chained(name) / "converted" / artifacts.PROGRAM
    seen, parses = [], []
    hints = _torch._TypingWithCachedHints.get_type_hints
    monkeypatch.setattr(
        _torch._TypingWithCachedHints, "get_type_hints", lambda *a, **k: seen.append(1) or hints(*a, **k)
    )
    monkeypatch.setattr(sympy, "sympify", lambda *a, sympify=sympy.sympify, **k: parses.append(1) or sympify(*a, **k))
    kept = _torch._load_program_file(path)
    assert seen and serialize.typing is typing and serialize.sympy is sympy
    monkeypatch.setattr(_torch, "_deserializer_caches", contextlib.nullcontext)
    calls = len(parses)
    plain = _torch._load_program_file(path)
    assert 0 < calls < len(parses) - calls  # the texts parsed once each, against a parse per size of every node
    assert str(kept.graph) == str(plain.graph) and str(kept.range_constraints) == str(plain.range_constraints)
    assert [str(n.meta.get("val")) for n in kept.graph.nodes] == [str(n.meta.get("val")) for n in plain.graph.nodes]
    assert kept.state_dict.keys() == plain.state_dict.keys()
    assert all(torch.equal(kept.state_dict[k], plain.state_dict[k]) for k in kept.state_dict)


@pytest.mark.slow
def test_export_writes_the_same_bytes_in_this_process_and_in_a_new_one(chained, tmp_path):
    """Export in this process and in a new one with another string hash seed: the same ONNX file to the byte
    (13 narrowed biases, whose Casts were once ordered by a set of names)."""
    from tests.conftest import cli_env, quantcli

    stages.export.run(chained("bert") / "converted", tmp_path / "model.onnx")
    again = quantcli(
        "export", chained("bert") / "converted", "-o", tmp_path / "again.onnx", env=cli_env(PYTHONHASHSEED="7")
    )
    assert again.rc == 0, again.stderr
    assert (tmp_path / "model.onnx").read_bytes() == (tmp_path / "again.onnx").read_bytes()


def test_runnable_program_computes_quantize_and_dequantize_bit_identically(chained):
    """_torch.runnable (parity's int8 reference in PyTorch) swaps torchao's per-tensor quantize/dequantize
    for in-place arithmetic: the outputs must not move by a bit."""
    import torch

    from quantcli import _torch

    program = _torch.load_program(chained("two_io") / "converted" / artifacts.PROGRAM)
    module = _torch.runnable(program)
    left = [str(n.target) for n in module.graph.nodes if "per_tensor" in str(n.target)]
    assert not left and any(n.target is _torch._quantize for n in module.graph.nodes)
    batch = example_batch("two_io", batch=16, seed=3)
    with torch.no_grad():
        expected, got = program.module()(*batch.values()), module(*batch.values())
    for a, b in zip(_torch.output_leaves(expected), _torch.output_leaves(got)):
        assert torch.equal(a[1], b[1])


def test_no_fold_quantize_keeps_float_weights(chained, tmp_path):
    stages.convert.run(chained("mlp") / "calibrated", tmp_path / "converted", fold_quantize=False)
    report = stages.export.run(tmp_path / "converted", tmp_path / "model.onnx").details["report"]
    model = onnx.load(str(tmp_path / "model.onnx"))
    float_matrices = [t for t in model.graph.initializer if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT]
    assert float_matrices and report["parity"]["passed"]


RESTORE = """
import sys, numpy as np, torch
from quantcli import artifacts
from quantcli.stages.base import restore_prepared
x = torch.from_numpy(np.load(sys.argv[1]))
for folder, out in zip(sys.argv[2::2], sys.argv[3::2]):
    art = artifacts.open_artifact(folder, ("prepared", "calibrated"), "test")
    with torch.no_grad():
        np.save(out, restore_prepared(art)(x).numpy())
"""


@pytest.mark.slow
def test_calibrated_artifact_restores_bit_identically_in_a_new_process(tmp_path):
    w = calibrated(tmp_path, "resnet")
    x = example_batch("resnet", batch=4, seed=3)["x"]
    np.save(tmp_path / "x.npy", x.numpy())
    # one process restores both stages, the calibrated one first (nothing loaded before it)
    stages_out = [(w / stage, tmp_path / f"{stage}.npy") for stage in ("calibrated", "prepared")]
    argv = [str(path) for pair in stages_out for path in pair]
    subprocess.run([sys.executable, "-c", RESTORE, str(tmp_path / "x.npy"), *argv], check=True, cwd=ROOT)
    outputs = {folder.name: np.load(out) for folder, out in stages_out}
    import torch

    from quantcli.stages.base import restore_prepared

    with torch.no_grad():
        here = restore_prepared(artifacts.open_artifact(w / "calibrated", ("calibrated",), "test"))(x).numpy()
    assert np.array_equal(here, outputs["calibrated"])
    # calibration changed the observers, so the restored state is not just the prepared one
    assert observers_changed(w / "prepared", w / "calibrated")


def test_calibration_uses_a_final_partial_batch_and_num_batches(tmp_path):
    w = prepared(tmp_path, "mlp", batch_size=10)  # 24 samples -> 10, 10, 4
    assert stages.calibrate.run(w / "prepared", w / "all").manifest["batches"] == 3
    assert stages.calibrate.run(w / "prepared", w / "two", batches=2).manifest["batches"] == 2


def test_npy_folder_and_factory_data_sources(tmp_path):
    w = prepared(tmp_path, "mlp")
    x = example_batch("mlp", batch=12, seed=5)["x"].numpy()
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "x.npy", x)
    (tmp_path / "factory.py").write_text(
        "import numpy as np\n"
        f"def batches():\n    x = np.load({str(tmp_path / 'npy' / 'x.npy')!r})\n"
        "    for i in range(0, 12, 4):\n        yield {'x': x[i:i + 4]}\n"
    )
    folder = stages.calibrate.run(w / "prepared", w / "from_npy", data=str(tmp_path / "npy"))
    factory = stages.calibrate.run(w / "prepared", w / "from_factory", data=f"{tmp_path / 'factory.py'}:batches")
    assert folder.manifest["batches"] == 2 and factory.manifest["batches"] == 3  # batch_size 8 vs factory's 4
    assert observers_changed(w / "prepared", w / "from_npy")
    assert observers_changed(w / "prepared", w / "from_factory")


def observers_changed(before: Path, after: Path) -> bool:
    import torch

    old = torch.load(before / artifacts.STATE, weights_only=True)
    new = torch.load(after / artifacts.STATE, weights_only=True)
    return any(k in old and (old[k].shape != v.shape or not torch.equal(old[k], v)) for k, v in new.items())


@pytest.mark.parametrize("name", ["mobilenet_v3", "bert"])
@pytest.mark.slow
def test_export_after_convert_in_one_process_reads_the_kept_program_and_writes_what_a_load_gives(
    name, chained, tmp_path, monkeypatch
):
    from quantcli import _torch

    stages.convert.run(chained(name) / "calibrated", tmp_path / "converted")
    program = tmp_path / "converted" / artifacts.PROGRAM
    loads, load = [], _torch._load_program_file
    monkeypatch.setattr(_torch, "_load_program_file", lambda path: loads.append(Path(path)) or load(path))
    stages.export.run(tmp_path / "converted", tmp_path / "kept.onnx")
    assert program not in loads  # convert's lifted program, kept as saved
    monkeypatch.setattr(_torch, "_LOADED", {})
    stages.export.run(tmp_path / "converted", tmp_path / "loaded.onnx")
    assert program in loads
    assert (tmp_path / "kept.onnx").read_bytes() == (tmp_path / "loaded.onnx").read_bytes()
