"""Class-index targets (accuracy, token accuracy): their form, from an array's header or its values.

`validate` and the stages' header checks read `problem` off the .npy header; the metrics pass each
batch of targets through `class_indices` before they count it, where the model's number of classes
is known. An [N, 1] column (or [N, seq, 1]) is read as [N] and said once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from quantcli.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

log = logging.getLogger("quantcli")

KEY = "evaluation.targets"


def _form(axes: int) -> str:
    return "[N]" if axes == 0 else "[N, " + ", ".join(["seq"] * axes) + "]"


def problem(shape: Sequence[int], dtype: Any, axes: int, metric: str) -> str | None:
    """What keeps targets of `shape` and `dtype` from being `metric`'s class indices, or None."""
    shape = [int(n) for n in shape]
    rank = len(shape) - (len(shape) == axes + 2 and shape[-1] == 1)  # an [N, 1] column counts as [N]
    if rank != axes + 1:
        return (
            f"{KEY} has shape {shape}; {metric} needs one class index per "
            f"{'sample' if axes == 0 else 'token'}, shape {_form(axes)} (one-hot or scores? store their argmax)"
        )
    if getattr(dtype, "kind", None) not in ("i", "u"):  # a numpy dtype or a header's Dtype: no numpy import
        return f"{KEY} is {dtype}; {metric} needs integer class indices"
    return None


def class_indices(targets: Any, axes: int, classes: int, metric: str, ignore: int | None = None) -> np.ndarray:
    """`targets` as integer class indices of rank axes + 1, each in [0, classes) (or `ignore`); a DataError else."""
    import numpy as np

    arr = np.asarray(targets)
    found = problem(arr.shape, arr.dtype, axes, metric)
    if found is not None:
        raise DataError(found)
    if arr.ndim == axes + 2:
        log.warning(
            f"{KEY}: a column of shape {_form(axes)[:-1]}, 1] is read as {_form(axes)}, one class index "
            f"per {'sample' if axes == 0 else 'token'}"
        )
        arr = arr[..., 0]
    counted = arr[arr != ignore] if ignore is not None else arr
    if counted.size and (counted.min() < 0 or counted.max() >= classes):
        bad = counted.min() if counted.min() < 0 else counted.max()
        raise DataError(
            f"{KEY} holds class {int(bad)}, but the model's output has {classes} classes (0 to {classes - 1})"
        )
    return arr
