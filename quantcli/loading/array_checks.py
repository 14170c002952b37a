"""Checks of data arrays against the recipe's inputs from their names, shapes and dtypes alone.

The loaders (loading.data) and `validate`'s header checks (loading.headers) word a problem the same
way with these; no numpy here, so `validate` stays instant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quantcli.loading.dtypes import DTYPES, UNSAFE, cast_kind
from quantcli.recipe import InputSpec


def missing_array(what: str, name: str, found: Any, role: str) -> str:
    """The one wording of an array the data lacks, shared with `validate`'s header checks."""
    return f"{what}: no array {name!r} in the data; it has {sorted(found)} ({role})"


def role_of(name: str, array: str, what: str) -> str:
    return f"for input {name!r}, mapped by {what}.keys" if array != name else f"for input {name!r}"


def shape_problem(spec: InputSpec, shape: Sequence[int], sample_axis: bool = True) -> str | None:
    """What is wrong with data of `shape` for `spec` (rank, static sizes, dynamic bounds), or None.

    With `sample_axis` the shape is a whole source's (axis 0 counts samples, not a batch), so axis 0
    is not compared; a batch (`sample_axis=False`) is checked on every axis."""
    shape = list(shape)
    if len(shape) != len(spec.shape):
        return f"input {spec.name!r} has shape {shape}, expected rank {len(spec.shape)} like {spec.shape}"
    bounds = spec.bounds()
    for axis, (got, want) in enumerate(zip(shape, spec.shape)):
        dim = bounds.get(axis)
        if sample_axis and axis == 0:
            continue
        if dim is None and got != want:
            return f"input {spec.name!r} has shape {shape}; axis {axis} must be {want} (static in the recipe)"
        if dim is not None and ((dim.min is not None and got < dim.min) or (dim.max is not None and got > dim.max)):
            return (
                f"input {spec.name!r} has shape {shape}; axis {axis} ({dim.name}) must be within "
                f"{dim.range()} (its bounds in the recipe)"
            )
    return None


def dtype_problem(spec: InputSpec, have: Any, array: str) -> str | None:
    """An unsafe dtype for `spec` (see dtypes.cast_kind), or None when it is the same or safely castable."""
    want = DTYPES[spec.dtype]
    if cast_kind(have, want) != UNSAFE:
        return None
    return (
        f"input {spec.name!r}{array_note(spec.name, array)} is {have} in the data but the recipe "
        f"declares {want}; a cast would change its values (convert the data, or declare the input's dtype)"
    )


def array_note(name: str, array: str) -> str:
    return f" (array {array!r})" if array != name else ""
