"""capture: build the model from the recipe and torch.export it with the recipe's dynamic axes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli import artifacts, diagnose, recipe as recipes, references
from quantcli.errors import RecipeError
from quantcli.loading.data import iter_batches, to_tensors
from quantcli.loading.headers import check_sources
from quantcli.loading.inputs import dynamic_shapes, example_batch
from quantcli.loading.model import build_model
from quantcli.stages.base import StageResult, data_hashes, produce, require_files


def output_names(result: Any, declared: list[str] | None) -> list[str]:
    """Names of the outputs (None outputs dropped): the recipe's, else a dict's keys (dotted into
    nested values), else output_0, output_1, ..."""
    from collections.abc import Mapping

    from quantcli import _torch

    leaves = _torch.output_leaves(result)
    if declared is not None:
        if len(declared) != len(leaves):
            raise RecipeError(f"outputs: names {len(declared)} outputs, but the model returns {len(leaves)}"
                              " (None outputs are dropped)")
        return list(declared)
    if isinstance(result, Mapping):
        return [path for path, _ in leaves]
    return [f"output_{i}" for i in range(len(leaves))]


def _model_files(recipe: recipes.Recipe) -> dict[str, str]:
    """Files that define the model: the factory file and any kwarg naming an existing file."""
    files = {}
    target = references.split_callable(recipe.model.factory)
    if target and target[0].endswith(".py"):
        files["model.factory"] = recipe.model.factory
        base = Path(target[0]).parent
        for name, value in recipe.model.kwargs.items():
            if isinstance(value, str) and value and (base / value).is_file():
                files[f"model.kwargs.{name}"] = str((base / value).resolve())
    return files


def run(recipe_path: str | Path, out: str | Path, *, force: bool = False) -> StageResult:
    recipe = recipes.load(recipe_path)
    data = data_hashes(_model_files(recipe))
    require_files({"calibration.data": recipe.calibration.data} if recipe.calibration else {})
    check_sources(recipe)  # every section's array names, dtypes and shapes, before any work

    def body(st: Any) -> dict[str, Any]:
        from quantcli import _torch

        scan_calibration(recipe)
        model = build_model(recipe.model)
        diagnose.check_signature(model, recipe.inputs)
        args = to_tensors(example_batch(recipe), recipe.inputs)
        try:
            with _torch.torch.no_grad():
                result = model(*args)
        except Exception as exc:  # the user's model and inputs disagree
            raise diagnose.capture_error(exc, None, recipe.inputs) from exc
        with _torch.portable_outputs(model, result):
            program = _export(model, args, recipe.inputs)
        _torch.save_program(program, st.tmp / artifacts.PROGRAM)
        return {"qat": False, "io": {"inputs": [i.name for i in recipe.inputs],
                                     "outputs": output_names(result, recipe.outputs)}}

    # The key covers the sections capture consumes (model, inputs, outputs) and the model's files,
    # so an edit of a later section (quantization, calibration, ...) reuses the captured program.
    return produce("captured", Path(out), recipe=recipe, parent=None, options={}, data=data, force=force, body=body)


def _export(model: Any, args: tuple, inputs: list) -> Any:
    """torch.export with the recipe's dynamic axes; a failure becomes one line naming its cause."""
    from quantcli import _torch

    shapes = dynamic_shapes(inputs)
    try:
        program = _torch.export_program(model, args, shapes)
        return _torch.without_dead_state(program, args, shapes)
    except Exception as exc:
        raise diagnose.capture_error(exc, _torch.export_failure(exc), inputs) from exc


def scan_calibration(recipe: recipes.Recipe) -> None:
    """Read every calibration batch of a file source through the loading checks (dtypes, NaN/Inf, counts),
    so bad calibration data fails here rather than at calibrate or convert. A data callable is user
    code: only its first batch (the example inputs) is read at capture."""
    cal = recipe.calibration
    if cal is None or (references.split_callable(cal.data) is not None and not references.exists(cal.data)):
        return
    _, batches = iter_batches(cal.data, cal.keys, recipe.inputs, cal.batch_size, cal.num_batches, "calibration")
    for _ in batches:
        pass
