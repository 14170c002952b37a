"""capture: build the model from the recipe and torch.export it with the recipe's dynamic axes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from quantcli import artifacts, diagnose, references
from quantcli import recipe as recipes
from quantcli.errors import ModelError, QuantCliError, RecipeError
from quantcli.loading.data import iter_batches, to_tensors
from quantcli.loading.factory import user_sources
from quantcli.loading.files import reader
from quantcli.loading.headers import check_sources
from quantcli.loading.inputs import capture_example, dynamic_shapes
from quantcli.sources.base import Built
from quantcli.sources.build import build_model
from quantcli.sources.names import TASKS
from quantcli.stages.base import StageResult, data_hashes, produce, require_files

log = logging.getLogger("quantcli")


def output_names(result: Any, declared: list[str] | None) -> list[str]:
    """Names of the outputs (None outputs dropped): the recipe's, else a dict's keys (dotted into
    nested values), else output_0, output_1, ..."""
    from collections.abc import Mapping

    from quantcli import _torch

    leaves = _torch.output_leaves(result)
    if declared is not None:
        if len(declared) != len(leaves):
            raise RecipeError(
                f"outputs: names {len(declared)} outputs, but the model returns {len(leaves)}"
                " (None outputs are dropped)"
            )
        return list(declared)
    if isinstance(result, Mapping):
        return [path for path, _ in leaves]
    return [f"output_{i}" for i in range(len(leaves))]


def _model_files(recipe: recipes.Recipe) -> dict[str, str]:
    """Files that define the model: the factory file and any kwarg naming an existing file; a Hugging
    Face folder; a torchvision/timm weights file."""
    files = {
        key: getattr(recipe.model, key.split(".")[1])
        for key in ("model.huggingface", "model.weights", "model.checkpoint")
        if getattr(recipe.model, key.split(".")[1]) is not None
    }
    target = references.split_callable(recipe.model.factory) if recipe.model.factory else None
    if target and target[0].endswith(".py"):
        files["model.factory"] = recipe.model.factory
        base = Path(target[0]).parent
        for name, value in recipe.model.kwargs.items():
            if isinstance(value, str) and value and (base / value).is_file():
                files[f"model.kwargs.{name}"] = str((base / value).resolve())
    return files


def _model_sources(recipe: recipes.Recipe) -> dict[str, str]:
    """The user source files the factory's import brings in beside the factory file itself (modules it imports
    from outside installed packages), keyed "model source <path>" (relative to the factory's folder)."""
    if recipe.model.factory is None:
        return {}
    from quantcli import _torch  # noqa: F401  (silences torch's and torchao's import noise, which user code pulls in)

    location, _ = references.split_callable(recipe.model.factory)
    base = Path(location).resolve().parent if location.endswith(".py") else Path.cwd()
    files = user_sources(recipe.model.factory, "model.factory", ModelError)
    return {
        f"model source {path.relative_to(base) if path.is_relative_to(base) else path}": digest
        for path, digest in files.items()
        if path != Path(location).resolve()
    }


def run(recipe_path: str | Path, out: str | Path, *, force: bool = False) -> StageResult:
    recipe = recipes.load(recipe_path)
    data = data_hashes(_model_files(recipe)) | _model_sources(recipe)
    require_files({"calibration.data": recipe.calibration.data} if recipe.calibration else {})
    check_sources(recipe)  # every section's array names, dtypes and shapes, before any work

    def body(st: Any) -> dict[str, Any]:
        from quantcli import _torch

        built = build_model(recipe)
        scan_calibration(built.recipe)
        program, result, resolved = _capture(built)
        _torch.save_program(program, st.tmp / artifacts.PROGRAM)
        declared = resolved.outputs or built.outputs
        extra = {"source": built.details} if built.details else {}
        # the recipe recorded is the resolved one: later stages read its inputs (and a zoo model's image
        # preprocessing) from here, and a later --recipe that leaves them out means "as resolved"
        return {
            "qat": False,
            "io": {"inputs": [i.name for i in resolved.inputs], "outputs": output_names(result, declared)},
            "recipe": resolved.model_dump(mode="json"),
            "recipe_hash": resolved.digest(),
            **extra,
        }

    # The key covers the sections capture consumes (model, inputs, outputs) as written, the model's files and
    # what its data settings decide at capture (max_length), so an edit of a later section (quantization,
    # calibration data, ...) reuses the captured program.
    return produce(
        "captured", Path(out), recipe=recipe, parent=None, options=_options(recipe), data=data, force=force, body=body
    )


def _options(recipe: recipes.Recipe) -> dict[str, Any]:
    """What beyond the consumed sections decides a source's resolved inputs: a text model's max_length."""
    if recipe.inputs is not None or recipe.model.task is None or TASKS[recipe.model.task].modality != "text":
        return {}
    sections = [getattr(recipe, n) for n in ("calibration", "training", "evaluation")]
    return {"max_length": next((s.max_length for s in sections if s is not None and s.max_length), None)}


def _capture(built: Built) -> tuple[Any, Any, recipes.Recipe]:
    """Export with the resolved inputs; where the model specializes a dynamic sequence, with it static."""
    try:
        program, result = _export(built.module, built.recipe)
        return program, result, built.recipe
    except QuantCliError as exc:
        if built.fallback is None:
            raise
        log.warning(
            f"the sequence axis is static ({built.fallback.inputs[0].shape[1]} tokens): torch.export cannot "
            f"keep it dynamic for this model ({exc.message.removeprefix('capture failed: ')[:200]})"
        )
    program, result = _export(built.module, built.fallback)
    return program, result, built.fallback


def _export(module: Any, recipe: recipes.Recipe) -> tuple[Any, Any]:
    """(the exported program, the model's output on the example batch) with the recipe's inputs and
    dynamic axes; a failure becomes one line naming its cause."""
    from quantcli import _torch

    diagnose.check_signature(module, recipe.inputs)
    args = to_tensors(capture_example(recipe), recipe.inputs)
    try:
        with _torch.torch.no_grad():
            result = module(*args)
    except Exception as exc:  # the user's model and inputs disagree
        raise diagnose.capture_error(exc, None, recipe.inputs) from exc
    shapes = dynamic_shapes(recipe.inputs)
    with _torch.portable_outputs(module, result):
        try:
            program = _torch.export_program(module, args, shapes)
            program = _torch.without_dead_state(program, args, shapes)
        except Exception as exc:
            raise diagnose.capture_error(exc, _torch.export_failure(exc), recipe.inputs) from exc
    return program, result


def scan_calibration(recipe: recipes.Recipe) -> None:
    """Read every calibration batch of an array source through the loading checks (dtypes, NaN/Inf, counts),
    so bad calibration data fails here rather than at calibrate or convert. A data callable is user
    code: only its first batch (the example inputs) is read at capture; text and image files are
    preprocessed by quantcli and read at calibrate."""
    cal = recipe.calibration
    if cal is None or (references.split_callable(cal.data) is not None and not references.exists(cal.data)):
        return
    if reader(recipe, "calibration") is not None:
        return
    _, batches = iter_batches(cal.data, cal.keys, recipe.inputs, cal.batch_size, cal.num_batches, "calibration")
    for _ in batches:
        pass
