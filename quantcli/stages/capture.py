"""capture: build the model from the recipe and torch.export it with the recipe's dynamic axes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli import artifacts, recipe as recipes, references
from quantcli.errors import ModelError, RecipeError
from quantcli.loading.data import to_tensors
from quantcli.loading.inputs import dynamic_shapes, example_batch
from quantcli.loading.model import build_model
from quantcli.stages.base import StageResult, data_hashes, produce, require_files


def output_names(result: Any, declared: list[str] | None) -> list[str]:
    """Names of the flattened outputs: the recipe's, else a dict's keys, else output_0, output_1, ..."""
    from quantcli import _torch

    torch = _torch.torch
    leaves = _torch.leaves(result)
    if declared is not None:
        if len(declared) != len(leaves):
            raise RecipeError(f"outputs: names {len(declared)} outputs, but the model returns {len(leaves)}")
        return list(declared)
    if isinstance(result, dict) and all(isinstance(v, torch.Tensor) for v in result.values()):
        return [str(k) for k in result]
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

    def body(st: Any) -> dict[str, Any]:
        from quantcli import _torch

        model = build_model(recipe.model)
        args = to_tensors(example_batch(recipe), recipe.inputs)
        try:
            with _torch.torch.no_grad():
                result = model(*args)
            program = _torch.export_program(model, args, dynamic_shapes(recipe.inputs))
            program = _torch.without_dead_state(program, args, dynamic_shapes(recipe.inputs))
        except Exception as exc:  # the user's model and inputs disagree
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"capture failed: {type(exc).__name__}: {first}",
                             "check the recipe's inputs (names, shapes, dtypes, dynamic_axes) against forward()") from exc
        _torch.save_program(program, st.tmp / artifacts.PROGRAM)
        return {"qat": False, "io": {"inputs": [i.name for i in recipe.inputs],
                                     "outputs": output_names(result, recipe.outputs)}}

    # The key covers the sections capture consumes (model, inputs, outputs) and the model's files,
    # so an edit of a later section (quantization, calibration, ...) reuses the captured program.
    return produce("captured", Path(out), recipe=recipe, parent=None, options={}, data=data, force=force, body=body)
