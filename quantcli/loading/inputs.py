"""Example inputs for capture and checks, and the dynamic shapes torch.export needs."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from quantcli.loading.data import iter_batches
from quantcli.recipe import DynamicAxis, InputSpec, Recipe

ATTENTION_MASK = "attention_mask"  # the name Hugging Face text models give their mask input


def synthetic(inputs: list[InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the recipe's shapes: floats standard normal, integers and booleans zero, but an attention
    mask, which attends everywhere (a mask hiding every token is no input a model sees: fully masked
    attention rows are where PyTorch and ONNX Runtime legitimately differ)."""
    rng = np.random.default_rng(seed)
    batch = {}
    for spec in inputs:
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            batch[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        else:
            batch[spec.name] = np.full(spec.shape, spec.name == ATTENTION_MASK, dtype=dtype)
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
        _, batches = iter_batches(
            cal.data, cal.keys, recipe.inputs, cal.batch_size, 1, "calibration", files=reader(recipe, "calibration")
        )
        for batch in batches:
            return batch
    return export_example(recipe.inputs)


def held_out_batch(recipe: Recipe) -> tuple[dict[str, np.ndarray], str]:
    """A batch the quantization ranges were not fitted to (export's parity sample), and what it is.

    The first evaluation batch; else the first calibration batch calibration did not read (the one
    after `num_batches`); else, where calibration read all its data, its first batch, said as such;
    without data, synthetic inputs of the recipe's shapes.
    """
    cal = recipe.calibration
    batch = _batch_at(recipe, "evaluation", 0) if recipe.evaluation is not None else None
    if batch is not None:
        return batch, "evaluation batch 0"
    batch = _batch_at(recipe, "calibration", cal.num_batches) if cal is not None and cal.num_batches else None
    if batch is not None:
        return batch, f"calibration batch {cal.num_batches}, held out from calibration (num_batches: {cal.num_batches})"
    if cal is not None:
        return example_batch(recipe), "calibration batch 0, which calibration read too (add an evaluation section)"
    return export_example(recipe.inputs), "synthetic inputs of the recipe's shapes"


def _batch_at(recipe: Recipe, name: str, index: int) -> dict[str, np.ndarray] | None:
    """Batch `index` of section `name`'s data, None when it holds fewer batches."""
    from quantcli.loading.files import reader

    section = getattr(recipe, name)
    _, batches = iter_batches(
        section.data, section.keys, recipe.inputs, section.batch_size, None, name, files=reader(recipe, name)
    )
    return next(itertools.islice(batches, index, None), None)


def capture_example(recipe: Recipe) -> dict[str, np.ndarray]:
    """The example batch for torch.export: a dynamic axis of size 1 (`batch_size: 1`, a callable yielding
    single samples) would be specialized to 1, so such an axis is repeated to size 2 (the data's values
    are kept; only the sizes torch.export sees change)."""
    batch = example_batch(recipe)
    for spec in recipe.inputs:
        for axis in spec.axes():
            if axis < np.ndim(batch[spec.name]) and np.shape(batch[spec.name])[axis] == 1:
                batch[spec.name] = np.repeat(batch[spec.name], 2, axis=axis)
    return batch


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

    dims = {
        name: torch.export.Dim(name, **{k: v for k, v in (("min", d.min), ("max", d.max)) if v is not None})
        for name, d in symbols(inputs).items()
    }
    return tuple({axis: dims[sym] for axis, sym in spec.axes().items()} or None for spec in inputs)
