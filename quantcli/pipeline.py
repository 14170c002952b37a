"""`quantcli run`, `--dry-run` and `validate`: the whole chain into one work folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli import recipe as recipes
from quantcli import references
from quantcli.errors import InputError, RecipeError
from quantcli.loading import file_checks, headers

ONNX_NAME = "model.onnx"


def plan(recipe_path: str | Path, work: str | Path) -> dict[str, Any]:
    """The stages `run` would execute, with their output folders, and the resolved recipe."""
    recipe = recipes.load(recipe_path)
    work = Path(work)
    qat = recipe.training is not None
    steps = [("capture", work / "captured"), ("prepare", work / "prepared")]
    if recipe.calibration is not None or recipe.quantization.weight_only:  # RTN reads no data, the stage still runs
        steps.append(("calibrate", work / "calibrated"))
    elif not qat:
        raise RecipeError(
            "calibration: missing; post-training quantization needs calibration data",
            "add a calibration: section (or a training: section for QAT)",
        )
    if qat:
        steps.append(("train", work / "trained"))
    steps += [("convert", work / "converted"), ("export", work / ONNX_NAME)]
    return {
        "recipe": recipe.model_dump(mode="json"),
        "qat": qat,
        "steps": [{"command": name, "out": str(path)} for name, path in steps],
    }


def run(
    recipe_path: str | Path, work: str | Path, *, force: bool = False, resume: bool = False, progress: Any = None
) -> list[Any]:
    """Every stage into `work`; `resume` continues an interrupted training from its checkpoint."""
    from quantcli import stages
    from quantcli.stages.base import no_progress

    # Later stages read the recipe again: they take the sections they consume from it, so a
    # reused capture (same model, inputs, outputs) meets the edited later sections.
    progress = progress or no_progress
    steps = {s["command"]: Path(s["out"]) for s in plan(recipe_path, work)["steps"]}
    qat = "train" in steps
    results = [stages.capture.run(recipe_path, steps["capture"], force=force)]
    results.append(
        stages.prepare.run(steps["capture"], steps["prepare"], qat=qat, recipe_path=recipe_path, force=force)
    )
    last = steps["prepare"]
    if "calibrate" in steps:
        results.append(
            stages.calibrate.run(last, steps["calibrate"], recipe_path=recipe_path, force=force, progress=progress)
        )
        last = steps["calibrate"]
    if qat:
        results.append(
            stages.train.run(
                last, steps["train"], recipe_path=recipe_path, resume=resume, force=force, progress=progress
            )
        )
        last = steps["train"]
    results.append(stages.convert.run(last, steps["convert"], force=force))
    results.append(stages.export.run(steps["convert"], steps["export"], recipe_path=recipe_path, force=force))
    return results


def validate(recipe_path: str | Path) -> dict[str, Any]:
    """Schema, referenced files and what they hold, without importing torch; raises with every problem listed.

    Exit 2 when the schema has problems or the recipe needs an optional package that is not installed
    (missing files are listed with them), else 3 for missing files, then 3 for what a model folder or data
    file lacks (a config, a column, images, class folders) and for data arrays that do not fit the inputs
    (names, dtypes, shapes, sample counts).
    """
    path = Path(recipe_path)
    data = recipes.read_yaml(path)
    recipe, problems = recipes.schema_problems(data)
    missing = references.file_problems(data, path.resolve().parent)
    if recipe is not None:
        recipe = recipes.resolve_paths(recipe, path.resolve().parent)
        problems = file_checks.extra_problems(recipe)
    if problems:
        problems += missing
        raise RecipeError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    if missing:
        raise InputError(f"{path}: " + "; ".join(missing))
    problems = file_checks.problems(recipe) + headers.data_problems(recipe)
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems))
    return {"recipe": str(recipe_path), "valid": True, "files": [p for _, p in recipes.referenced_files(recipe)]}
