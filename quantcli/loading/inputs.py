"""Example inputs for capture and checks, and the dynamic shapes torch.export needs."""

from __future__ import annotations

from typing import Any

import numpy as np

from quantcli.loading.data import iter_batches
from quantcli.recipe import DynamicAxis, InputSpec, Recipe


def synthetic(inputs: list[InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the recipe's shapes: floats standard normal, integers and booleans zero."""
    rng = np.random.default_rng(seed)
    batch = {}
    for spec in inputs:
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            batch[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        else:
            batch[spec.name] = np.zeros(spec.shape, dtype=dtype)
    return batch


def export_example(inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Synthetic inputs for torch.export: a dynamic axis of size 1 would be specialized, so it gets 2,
    within the symbol's bounds."""
    dims = symbols(inputs)

    def size(spec: InputSpec, axis: int, d: int) -> int:
        name = spec.axes().get(axis)
        if name is None:
            return d
        d = max(d, 2, dims[name].min or 0)
        return d if dims[name].max is None else min(d, dims[name].max)

    widened = [i.model_copy(update={"shape": [size(i, a, d) for a, d in enumerate(i.shape)]}) for i in inputs]
    return synthetic(widened)


def example_batch(recipe: Recipe) -> dict[str, np.ndarray]:
    """The first calibration batch when there is data (keeps token ids valid), else synthetic."""
    from quantcli.loading.files import reader

    cal = recipe.calibration
    if cal is not None:
        _, batches = iter_batches(cal.data, cal.keys, recipe.inputs, cal.batch_size, 1, "calibration",
                                  files=reader(recipe, "calibration"))
        for batch in batches:
            return batch
    return export_example(recipe.inputs)


def symbols(inputs: list[InputSpec]) -> dict[str, DynamicAxis]:
    """Each dynamic-axis symbol once, with its bounds (the schema rejects conflicting ones)."""
    found: dict[str, DynamicAxis] = {}
    for spec in inputs:
        for dim in spec.bounds().values():
            if dim.name not in found or dim.min is not None or dim.max is not None:
                found[dim.name] = dim
    return found


def dynamic_shapes(inputs: list[InputSpec]) -> tuple[dict[int, Any] | None, ...]:
    """One dict per input mapping axis -> torch.export.Dim(name, min=, max=); symbols are shared by name."""
    import torch

    dims = {name: torch.export.Dim(name, **{k: v for k, v in (("min", d.min), ("max", d.max)) if v is not None})
            for name, d in symbols(inputs).items()}
    return tuple({axis: dims[sym] for axis, sym in spec.axes().items()} or None for spec in inputs)
