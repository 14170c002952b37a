"""Every bad input of the pipeline and CI issues, through the real CLI.

Each case asserts the documented exit code, exactly one error line on stderr naming the problem
(no traceback, nothing on stdout), and that nothing was left behind: no output, no temporary
sibling, and a pre-existing path untouched.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DIGITS, assert_fails, cli, digits_recipe, leftovers, snapshot

FACTORIES = textwrap.dedent("""
    import numpy as np
    import torch

    def not_a_module():
        return {"weights": 1}

    def raises():
        raise RuntimeError("checkpoint weights.pt is missing")

    def wrong_shape_batches():
        for _ in range(2):
            yield {"calib_x": np.zeros((4, 3, 8, 8), np.float32)}
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Bad model factories and data files, in a folder of their own."""
    folder = tmp_path_factory.mktemp("bad-files")
    (folder / "factories.py").write_text(FACTORIES)
    (folder / "broken.py").write_text("import a_package_that_is_not_installed\n")
    np.savez(folder / "missing_array.npz", other=np.zeros((8, 1, 8, 8), np.float32))
    np.savez(folder / "wrong_shape.npz", calib_x=np.zeros((8, 1, 7, 7), np.float32))
    (folder / "not_npz.npz").write_bytes(b"this is not a zip file")
    return folder


def assert_nothing_left(out: Path, before: dict[str, str] | None = None) -> None:
    """No partial output: `out` absent (or exactly as it was), no temporary siblings."""
    if before is None:
        assert not out.exists(), f"{out} was left behind"
    else:
        assert snapshot(out) == before, f"{out} was changed"
    if out.parent.exists():
        assert leftovers(out.parent) == []


# --- the recipe: exit 2 for its content, 3 when it cannot be read ---------------------------------

RECIPE_TEXT = {
    "malformed-yaml": ("model: [unclosed\n  x: 1\n", 2, ["invalid YAML at line 2, column 4"]),
    "not-a-mapping": ("- model\n- inputs\n", 2, ["the recipe must be a YAML mapping, got list"]),
    "empty": ("", 2, ["the recipe is empty"]),
    "not-utf8": (b"model: \xff\xfe\n", 2, ["invalid YAML: not UTF-8 text"]),
    "unknown-keys": (
        f"model: {{factory: '{DIGITS / 'model.py'}:build', kwarg: {{}}}}\n"
        "inputs: [{name: x, shape: [1], dtyp: float32}]\n"
        "calibraton: {data: d.npz}\n",
        2,
        [
            "3 problem(s)",
            "model.kwarg: unknown key; did you mean 'kwargs'?",
            "inputs.0.dtyp: unknown key; did you mean 'dtype'?",
            "calibraton: unknown key; did you mean 'calibration'?",
        ],
    ),
    "invalid-values": (
        "model: {factory: m.py}\ninputs: [{name: x, shape: [0]}]\nexport: {opset: 99}\n"
        "quantization: {target: onnxruntim}\n",
        2,
        [
            'model.factory: must look like "file.py:callable"',
            "inputs.0.shape: every dimension",
            "export.opset: Input should be less than or equal to 23",
            "quantization.target: unknown target 'onnxruntim'; did you mean 'onnxruntime'?",
        ],
    ),
}


@pytest.mark.parametrize("command", ["validate", "capture", "run"])
@pytest.mark.parametrize("case", sorted(RECIPE_TEXT))
def test_bad_recipe_fails_before_any_work(tmp_path, case, command):
    content, code, fragments = RECIPE_TEXT[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    args = {
        "validate": ["validate", recipe],
        "capture": ["capture", "--recipe", recipe, "-o", out],
        "run": ["run", "--recipe", recipe, "-o", out],
    }[command]
    assert_fails(cli(*args), code, str(recipe), *fragments)
    assert_nothing_left(out)


@pytest.mark.parametrize("command", ["validate", "capture", "run"])
def test_missing_recipe_is_an_input_error(tmp_path, command):
    recipe, out = tmp_path / "none.yaml", tmp_path / "out"
    args = {
        "validate": ["validate", recipe],
        "capture": ["capture", "--recipe", recipe, "-o", out],
        "run": ["run", "--recipe", recipe, "-o", out, "--dry-run"],
    }[command]
    assert_fails(cli(*args), 3, f"recipe not found: {recipe}")
    assert_nothing_left(out)


def test_validate_names_every_missing_file_and_module(tmp_path):
    recipe = digits_recipe(
        tmp_path,
        model={"factory": "nowhere.py:build"},
        calibration={"data": "missing.npz", "keys": {"x": "calib_x"}},
        evaluation={"data": "no_such_package_xyz.data:load", "targets": "y"},
    )
    assert_fails(
        cli("validate", recipe),
        3,
        f"model.factory: file not found: {tmp_path / 'nowhere.py'}",
        f"calibration.data: file not found: {tmp_path / 'missing.npz'}",
        "evaluation.data: no module named 'no_such_package_xyz.data'",
    )


# --- the model factory and the inputs: exit 3 -------------------------------------------------------


def _model_cases(files: Path) -> dict[str, tuple[dict, list[str]]]:
    return {
        "factory-file-missing": (
            {"model": {"factory": str(files / "nowhere.py") + ":build"}},
            [f"model.factory: file not found: {files / 'nowhere.py'}"],
        ),
        "factory-import-fails": (
            {"model": {"factory": f"{files / 'broken.py'}:build"}},
            [
                f"model.factory: cannot import {files / 'broken.py'}: ModuleNotFoundError: "
                "No module named 'a_package_that_is_not_installed'"
            ],
        ),
        "factory-callable-missing": (
            {"model": {"factory": f"{files / 'factories.py'}:nothing"}},
            ["has no callable named 'nothing'"],
        ),
        "factory-raises": (
            {"model": {"factory": f"{files / 'factories.py'}:raises"}},
            ["factories.py:raises failed: RuntimeError: checkpoint weights.pt is missing"],
        ),
        "factory-returns-no-module": (
            {"model": {"factory": f"{files / 'factories.py'}:not_a_module"}},
            ["factories.py:not_a_module returned dict, not a torch.nn.Module"],
        ),
        "inputs-wrong-channels": (
            {"inputs": [{"name": "x", "shape": [4, 3, 8, 8]}], "calibration": None, "evaluation": None},
            [
                "capture failed: RuntimeError:",
                "expected input[2, 3, 8, 8] to have 1 channels",
                "check the recipe's inputs",
            ],
        ),
        "calibration-array-missing": (
            {"calibration": {"data": str(files / "missing_array.npz"), "keys": {"x": "calib_x"}}},
            ["calibration: no array 'calib_x' in the data; it has ['other']"],
        ),
        "calibration-wrong-shape": (
            {"calibration": {"data": str(files / "wrong_shape.npz"), "keys": {"x": "calib_x"}}},
            ["calibration: input 'x' has shape [8, 1, 7, 7]; axis 2 must be 8"],
        ),
        "calibration-not-npz": (
            {"calibration": {"data": str(files / "not_npz.npz")}},
            [f"calibration: cannot read {files / 'not_npz.npz'} as .npz"],
        ),
        "calibration-file-missing": (
            {"calibration": {"data": str(files / "none.npz")}},
            [f"calibration.data: file not found: {files / 'none.npz'}"],
        ),
    }


MODEL_CASES = sorted(_model_cases(Path("/x")))


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_or_data_at_capture(tmp_path, files, case):
    sections, fragments = _model_cases(files)[case]
    recipe = digits_recipe(tmp_path, **sections)
    out = tmp_path / "w" / "captured"
    assert_fails(cli("capture", "--recipe", recipe, "-o", out), 3, *fragments)
    assert_nothing_left(out)


# --- calibration data given to calibrate: exit 3 (capture checks the recipe's data the same way) ------


@pytest.mark.parametrize(
    "data, fragments",
    [
        ("missing_array.npz", ["calibration: no array 'calib_x' in the data; it has ['other']"]),
        (
            "factories.py:wrong_shape_batches",
            ["calibration batch 0: input 'x' has shape [4, 3, 8, 8]; axis 1 must be 1"],
        ),
        ("none.npz", ["calibration.data: file not found"]),
    ],
)
def test_bad_calibration_data(work, files, tmp_path, data, fragments):
    out = tmp_path / "calibrated"
    assert_fails(cli("calibrate", work / "prepared", "-o", out, "--data", files / data), 3, *fragments)
    assert_nothing_left(out)


# --- artifacts: the wrong stage, damaged, missing: exit 4 (3 when the path does not exist) ----------


@pytest.mark.parametrize(
    "command, src, fragment",
    [
        (
            "convert",
            "captured",
            "is a captured artifact; `quantcli convert` needs calibrated (made by `quantcli calibrate`) "
            "or trained (made by `quantcli train`)",
        ),
        (
            "prepare",
            "calibrated",
            "is a calibrated artifact; `quantcli prepare` needs captured (made by `quantcli capture`)",
        ),
        (
            "calibrate",
            "converted",
            "is a converted artifact; `quantcli calibrate` needs prepared (made by `quantcli prepare`)",
        ),
        (
            "export",
            "calibrated",
            "is a calibrated artifact; `quantcli export` needs converted (made by `quantcli convert`)",
        ),
        ("inspect", "model.report.json", "is not a quantcli artifact (no manifest.json)"),
    ],
)
def test_wrong_stage_names_the_command_that_makes_what_is_needed(work, tmp_path, command, src, fragment):
    out = tmp_path / ("model.onnx" if command == "export" else "out")
    args = [command, work / src] + ([] if command == "inspect" else ["-o", out])
    assert_fails(cli(*args), 4, f"{work / src} {fragment}")
    assert_nothing_left(out)


def test_missing_input_artifact_is_an_input_error(tmp_path):
    out = tmp_path / "converted"
    assert_fails(
        cli("convert", tmp_path / "calibrated", "-o", out),
        3,
        f"{tmp_path / 'calibrated'} does not exist (`quantcli convert` needs a calibrated artifact "
        "(made by `quantcli calibrate`) or a trained artifact (made by `quantcli train`))",
    )
    assert_nothing_left(out)


def _truncate(folder: Path) -> None:
    with open(folder / "state.pt", "r+b") as fh:
        fh.truncate(1000)


def _flip_byte(folder: Path) -> None:
    data = bytearray((folder / "program.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "program.pt2").write_bytes(bytes(data))


def _edit_manifest(**fields):
    def edit(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, **fields}))

    return edit


DAMAGE = {
    "truncated": (_truncate, " is corrupt: state.pt is truncated or altered: 1000 bytes, the manifest records"),
    "corrupted": (_flip_byte, " is corrupt: program.pt2 does not match its recorded sha256"),
    "file-missing": (lambda f: (f / "state.pt").unlink(), " is corrupt: state.pt is missing"),
    "manifest-garbled": (
        lambda f: (f / "manifest.json").write_text('{"stage": "calib'),
        "/manifest.json is corrupt: Unterminated string",
    ),
    "manifest-missing": (lambda f: (f / "manifest.json").unlink(), " is not a quantcli artifact (no manifest.json)"),
    "other-schema": (_edit_manifest(schema_version=99), " has artifact schema 99, this quantcli reads 2"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_input_artifact_is_refused_naming_the_file(copy_work, case):
    damage, fragment = DAMAGE[case]
    w = copy_work("calibrated")
    damage(w / "calibrated")
    out = w / "converted"
    line = assert_fails(cli("convert", w / "calibrated", "-o", out), 4, f"{w / 'calibrated'}{fragment}")
    if case in ("truncated", "corrupted", "file-missing"):
        assert line.endswith("(recreate it with `quantcli calibrate`)")
    assert_nothing_left(out)


def test_inspect_refuses_a_corrupt_artifact(copy_work):
    w = copy_work("converted")
    _flip_byte(w / "converted")
    message = f"{w / 'converted'} is corrupt: program.pt2 does not match its recorded sha256"
    run = cli("inspect", w / "converted", "--json")
    assert run.rc == 4 and run.json() == {"error": {"code": 4, "kind": "artifact", "message": message}}
    assert run.error_line() == f"error: {message}"


# --- output paths that may not be replaced: exit 4 ---------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_a_folder_that_is_not_an_artifact_is_never_replaced(work, tmp_path, force):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own file")
    before = snapshot(out)
    args = ["prepare", work / "captured", "-o", out] + (["--force"] if force else [])
    assert_fails(
        cli(*args), 4, f"{out} exists and is not a quantcli artifact (choose another output path; it is never replaced)"
    )
    assert_nothing_left(out, before)


def test_force_never_deletes_the_users_files_inside_an_artifact(copy_work):
    w = copy_work("captured", "prepared")
    (w / "prepared" / "my-notes.txt").write_text("mine")
    before = snapshot(w / "prepared")
    assert_fails(
        cli("prepare", w / "captured", "-o", w / "prepared", "--force"),
        4,
        f"{w / 'prepared'} holds files quantcli did not write (my-notes.txt)",
    )
    assert_nothing_left(w / "prepared", before)


def test_an_artifact_of_another_stage_is_refused_and_force_replaces_it(copy_work):
    w = copy_work("captured", "calibrated")
    before = snapshot(w / "calibrated")
    assert_fails(
        cli("prepare", w / "captured", "-o", w / "calibrated"),
        4,
        f"{w / 'calibrated'} exists and is a calibrated artifact, not a prepared one "
        "(choose another output path, or pass --force to replace it)",
    )
    assert_nothing_left(w / "calibrated", before)
    forced = cli("prepare", w / "captured", "-o", w / "calibrated", "--force")
    assert forced.rc == 0, forced.stderr
    assert json.loads((w / "calibrated" / "manifest.json").read_text())["stage"] == "prepared"
    assert sorted(p.name for p in w.iterdir()) == ["calibrated", "captured"]  # no temporary, no old copy


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_export_never_replaces_a_file_it_did_not_write(work, tmp_path, force):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"somebody else's model")
    args = ["export", work / "converted", "-o", out] + (["--force"] if force else [])
    assert_fails(
        cli(*args),
        4,
        f"{out} exists and was not written by quantcli export (choose another output path; it is never replaced)",
    )
    assert out.read_bytes() == b"somebody else's model"
    assert leftovers(tmp_path) == [] and not (tmp_path / "model.report.json").exists()


def test_export_to_a_folder_is_refused(work, tmp_path):
    assert_fails(cli("export", work / "converted", "-o", tmp_path), 4, f"{tmp_path} is a folder")


# --- the command line itself: exit 2 ------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["capture", "-o", "x"], "Missing option '--recipe'. (see `quantcli capture --help`)"),
        (["prepare", "x", "-o", "y", "--bogus"], "No such option: --bogus"),
        (["calibrate", "x", "-o", "y", "--batches", "0"], "Invalid value for '--batches'"),
        (["export", "x", "-o", "y", "--opset", "eighteen"], "Invalid value for '--opset'"),
        (["frobnicate"], "No such command 'frobnicate'. (see `quantcli --help`)"),
    ],
)
def test_usage_errors_are_one_line_too(tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    run = cli(*args)
    assert_fails(run, 2, fragment)
    assert list(tmp_path.iterdir()) == []
    with_json = cli(*args, "--json")
    assert with_json.rc == 2 and with_json.json()["error"]["kind"] == "usage"


def test_debug_adds_the_traceback(tmp_path):
    recipe = digits_recipe(tmp_path, model={"factory": "nowhere.py:build"})
    run = cli("capture", "--recipe", recipe, "-o", tmp_path / "out", "--debug")
    assert run.rc == 3 and "Traceback (most recent call last)" in run.stderr
    assert run.stderr.splitlines()[-1].startswith("error: model.factory: file not found")


# --- loading is safe: a crafted program.pt2 (say, from a poisoned CI cache) runs no code ------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling it creates the marker file


def _craft(program: Path, marker: Path, how: str) -> None:
    """Rewrite a .pt2 archive so that torch.export.load would unpickle `_Payload`."""
    import pickle
    import zipfile

    members = []
    with zipfile.ZipFile(program) as archive:
        for info in archive.infolist():
            data = archive.read(info.filename)
            if how == "sample-inputs" and info.filename.endswith("data/sample_inputs/model.pt"):
                data = pickle.dumps(_Payload(marker), protocol=2)
            if how == "pickled-weight" and info.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                data = json.dumps(config).encode()
            members.append((info, data))
    with zipfile.ZipFile(program, "w") as archive:
        for info, data in members:
            archive.writestr(info, data)


@pytest.mark.parametrize(
    "how, fragment",
    [
        ("sample-inputs", "program.pt2 cannot be loaded safely by this torch: UnpicklingError"),
        ("pickled-weight", "program.pt2 holds a pickled object"),
    ],
)
def test_a_crafted_program_is_refused_without_running_its_code(copy_work, tmp_path, how, fragment):
    w = copy_work("captured")
    marker = tmp_path / "code-ran"
    _craft(w / "captured" / "program.pt2", marker, how)
    manifest = json.loads((w / "captured" / "manifest.json").read_text())  # whoever crafted it fixed the hashes
    data = (w / "captured" / "program.pt2").read_bytes()
    manifest["files"]["program.pt2"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (w / "captured" / "manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    out = w / "prepared"
    assert_fails(cli("prepare", w / "captured", "-o", out), 4, fragment)
    assert not marker.exists(), "unpickling the crafted archive ran code"
    assert_nothing_left(out)
