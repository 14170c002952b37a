"""What `tune` writes into `-o`, under the rules every stage follows (quantcli.staging).

`<out>/recipe.yaml` and `<out>/tune.json` are tune's own: tune.json records the sha256 of the
recipe it wrote beside it. An existing file of either name that tune did not write (a user's
recipe, any other file) is refused unless `--force`; the recipe tune reads is never replaced.
Each file is written to a hidden sibling and renamed into place, so nothing is half-written.
The model is the best trial's: its stage folders and ONNX file are linked into `<out>` as they
are (no rerun), each checked like a stage output: the same key is reused, another is refused
unless `--force`, a path quantcli did not write is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from quantcli import artifacts, staging
from quantcli.errors import ArtifactError

OUTCOME = "tune.json"
RECIPE = "recipe.yaml"
STAGE_FOLDERS = ("captured", "prepared", "calibrated", "converted")


def write_atomic(path: Path, data: bytes) -> None:
    """`data` into `path` through a hidden sibling and one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging.tmp_sibling(path)
    try:
        tmp.write_bytes(data)
        staging.replace_into(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _outcome_of(out: Path) -> dict[str, Any] | None:
    """The tune.json at `out` when tune wrote it, else None."""
    try:
        doc = json.loads((out / OUTCOME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and {"goal", "best", "trials"} <= set(doc) else None


def check_own_files(out: Path, recipe_path: Path, force: bool) -> None:
    """Refuse, before any work, to replace a recipe.yaml or tune.json at `out` that tune did not write."""
    recipe, outcome = out / RECIPE, out / OUTCOME
    if recipe.exists() and recipe_path.exists() and recipe.resolve() == recipe_path.resolve():
        raise ArtifactError(
            f"{recipe} is the recipe tune reads; tune writes its recipe there",
            "choose another output folder with -o; the input recipe is never replaced",
        )
    for path in (recipe, outcome):
        if path.is_dir():
            raise ArtifactError(f"{path} exists and is a folder", staging.NEVER)
    if force:
        return
    written = _outcome_of(out)
    if outcome.exists() and written is None:
        raise ArtifactError(f"{outcome} exists and was not written by quantcli tune", staging.FORCE)
    if recipe.exists() and (written is None or written.get("recipe_sha256") != _sha256(recipe.read_bytes())):
        raise ArtifactError(f"{recipe} exists and was not written by quantcli tune", staging.FORCE)


def write_own_files(out: Path, recipe_text: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """The tuned recipe, then tune.json recording its sha256; the outcome as written."""
    data = recipe_text.encode()
    outcome = {**outcome, "recipe_sha256": _sha256(data)}
    write_atomic(out / RECIPE, data)
    write_atomic(out / OUTCOME, (json.dumps(outcome, indent=2, sort_keys=True) + "\n").encode())
    return outcome


def adopt(base: Path, trial: Path, out: Path, force: bool) -> None:
    """Link the best trial's chain (its capture is the baseline's) into `out`; every output checked first."""
    sources = {"captured": base / "captured", **{name: trial / name for name in STAGE_FOLDERS[1:]}}
    onnx = trial / "model.onnx"
    todo = [name for name, src in sources.items() if _needs_copy(src, out / name, force)]
    onnx_todo = _onnx_needs_copy(onnx, out / onnx.name, force)
    for name in todo:
        _copy_folder(sources[name], out / name)
    if onnx_todo:
        with staging.staging(out / onnx.name, onnx_file=True) as st:
            shutil.copyfile(onnx, st.tmp)
            if artifacts.data_path(onnx).exists():  # a large model's tensors, under the name the model gives them
                shutil.copyfile(artifacts.data_path(onnx), artifacts.data_path(st.tmp))
            shutil.copyfile(artifacts.report_path(onnx), st.tmp_report)


def _needs_copy(src: Path, dst: Path, force: bool) -> bool:
    manifest = artifacts.read_manifest(src)
    existing = staging.check_output(dst, manifest["key"], force, manifest["stage"])
    return existing is None or artifacts.read_manifest(dst) != manifest


def _onnx_needs_copy(src: Path, dst: Path, force: bool) -> bool:
    from quantcli.onnx.export import read_metadata

    existing = staging.check_onnx(dst, read_metadata(src)["key"], force)
    return existing is None or artifacts.sha256_file(dst) != artifacts.sha256_file(src)


def _copy_folder(src: Path, dst: Path) -> None:
    with staging.staging(dst) as st:
        for path in sorted(src.iterdir()):
            if path.is_file():
                staging.link_or_copy(path, st.tmp / path.name)
