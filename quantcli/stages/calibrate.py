"""calibrate: feed calibration batches through the prepared model so observers collect ranges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli import artifacts
from quantcli.errors import DataError, RecipeError
from quantcli.loading.data import iter_batches, samples_in, to_tensors
from quantcli.loading.headers import check_sources
from quantcli.recipe import CalibrationSection, Recipe
from quantcli.stages.base import (Progress, StageResult, carry_program, data_hashes, no_progress, produce,
                                  recipe_for, restore_prepared, save_state)


def with_overrides(recipe: Recipe, data: str | None, batches: int | None) -> CalibrationSection:
    """The calibration section after --data and --batches are applied."""
    section = recipe.calibration
    if section is None and data is None:
        raise RecipeError("calibration.data is not set", "pass --data FILE.npz or add a calibration: section")
    section = section or CalibrationSection(data=str(Path(data).resolve()))
    update: dict[str, Any] = {}
    if data is not None:
        update["data"] = str(Path(data).resolve()) if Path(data).exists() else data
    if batches is not None:
        update["num_batches"] = batches
    return section.model_copy(update=update)


def run_batches(module: Any, recipe: Recipe, progress: Progress) -> tuple[int, int]:
    """Feed the calibration batches through `module`; (batches, samples) seen."""
    from quantcli import _torch
    from quantcli.loading.files import reader

    section, inputs = recipe.calibration, recipe.inputs
    total, batches = iter_batches(section.data, section.keys, inputs, section.batch_size, section.num_batches,
                                  "calibration", files=reader(recipe, "calibration"))
    seen = samples = 0
    with _torch.torch.no_grad():
        for index, batch in enumerate(batches):
            args = to_tensors(batch, inputs)
            try:
                module(*args)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise DataError(f"calibration batch {index} does not fit the model: {first}") from exc
            seen += 1
            samples += samples_in(batch)
            progress(seen, total or None, {})
    if seen == 0:
        raise DataError("calibration: the data yielded no batches")
    return seen, samples


def run(src: str | Path, out: str | Path, *, data: str | None = None, batches: int | None = None,
        recipe_path: str | Path | None = None, force: bool = False, progress: Progress = no_progress) -> StageResult:
    parent = artifacts.open_artifact(src, ("prepared",), "calibrate")
    recipe = recipe_for("calibrated", parent, recipe_path)
    section = with_overrides(recipe, data, batches)
    recipe = recipe.model_copy(update={"calibration": section})
    hashes = data_hashes({"calibration.data": section.data})
    check_sources(recipe, ("calibration",))

    def body(st: Any) -> dict[str, Any]:
        module = restore_prepared(parent)
        seen, samples = run_batches(module, recipe, progress)
        carry_program(parent, st.tmp)
        save_state(module, st.tmp)
        return {"qat": parent.manifest["qat"], "io": parent.manifest["io"], "batches": seen, "samples": samples}

    result = produce("calibrated", Path(out), recipe=recipe, parent=parent, options={}, data=hashes,
                     force=force, body=body)
    result.work = work_done(result.manifest)
    return result


def work_done(manifest: dict[str, Any]) -> str:
    """"N batches, M samples" as a calibrated manifest records them ("" for artifacts made before it did)."""
    if "samples" not in manifest:
        return f"{manifest['batches']} batches" if "batches" in manifest else ""
    return f"{manifest['batches']} batches, {manifest['samples']} samples"
