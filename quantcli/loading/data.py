"""Data sources for calibration, training and evaluation, and batching.

A source is one of:
- an .npz file: arrays named after the inputs (or mapped by `keys`), first axis = samples;
- a folder of .npy files (`<array>.npy`), memory-mapped so memory stays bounded by a batch;
- "file.py:callable" (or "package.module:callable"): called with no arguments, it returns an
  iterable of dicts of arrays, each dict one batch keyed by input name (or mapped by `keys`).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from quantcli.errors import DataError
from quantcli.loading.dtypes import NUMPY_DTYPES
from quantcli.loading.factory import load_callable
from quantcli.recipe import InputSpec
from quantcli.references import split_callable



def open_arrays(spec: str, what: str) -> Mapping[str, Any]:
    """Name -> array (lazily loaded) for an .npz file or a folder of .npy files."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise DataError(f"{what}: folder {path} holds no .npy files")
        try:
            return {f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in files}
        except (OSError, ValueError) as exc:
            raise DataError(f"{what}: cannot read {path}: {exc}") from None
    if not path.is_file():
        raise DataError(f"{what}: data not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{what}: cannot read {path} as .npz: {exc}") from None


def _get(arrays: Mapping[str, Any], name: str, what: str) -> np.ndarray:
    if name not in arrays:
        raise DataError(f"{what}: no array {name!r} in the data; it has {sorted(arrays)}")
    try:
        return arrays[name]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{what}: cannot read array {name!r}: {exc}") from None


def check_batch(batch: Mapping[str, Any], inputs: list[InputSpec], what: str, sample_axis: bool = True) -> None:
    """Check every input is present with the rank and static dimensions the recipe declares."""
    for spec in inputs:
        if spec.name not in batch:
            raise DataError(f"{what}: no array for input {spec.name!r}; got {sorted(batch)}")
        arr = batch[spec.name]
        dynamic = spec.axes()
        if arr.ndim != len(spec.shape):
            raise DataError(f"{what}: input {spec.name!r} has shape {list(arr.shape)}, expected rank {len(spec.shape)} like {spec.shape}")
        for axis, (got, want) in enumerate(zip(arr.shape, spec.shape)):
            if axis not in dynamic and got != want:
                raise DataError(f"{what}: input {spec.name!r} has shape {list(arr.shape)}; axis {axis} must be {want} (static in the recipe)")


@dataclass
class Dataset:
    """Arrays for the recipe's inputs (and optional targets), sliced into batches on demand."""

    columns: dict[str, Any]  # input name (or "__targets__") -> array-like, first axis = samples
    length: int

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(arr[start:stop]) for name, arr in self.columns.items()}

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(arr[np.sort(index)]) for name, arr in self.columns.items()}


TARGET_COLUMN = "__targets__"  # the targets' column in a batch, beside the inputs


def load_dataset(spec: str, keys: dict[str, str], inputs: list[InputSpec], what: str,
                 targets: str | None = None, files: Any = None) -> Dataset:
    """The samples of an .npz file or .npy folder; `files` (loading.files.reader) reads text and image files."""
    if files is not None:
        return files.dataset()
    arrays = open_arrays(spec, what)
    columns = {i.name: _get(arrays, keys.get(i.name, i.name), what) for i in inputs}
    if targets is not None:
        columns[TARGET_COLUMN] = _get(arrays, targets, what)
    lengths = {name: arr.shape[0] if arr.ndim else 0 for name, arr in columns.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{what}: arrays disagree on the number of samples: {lengths}")
    length = next(iter(lengths.values()))
    if length == 0:
        raise DataError(f"{what}: the data holds no samples")
    check_batch({k: v for k, v in columns.items() if k != TARGET_COLUMN}, inputs, what)
    return Dataset(columns, length)


def iter_batches(spec: str, keys: dict[str, str], inputs: list[InputSpec], batch_size: int,
                 num_batches: int | None, what: str, targets: str | None = None,
                 files: Any = None) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
    """(number of batches, iterator of input-name -> array batches); a final partial batch included.

    With `targets` (an array name), each batch also holds the targets under TARGET_COLUMN. The
    one loading path of calibration and evaluation data, whatever the source: `files` (made by
    loading.files.reader for text, tables and image folders) streams them preprocessed the model's way.
    """
    if files is not None:
        return files.iter_batches(batch_size, num_batches)
    if split_callable(spec) is not None and not Path(spec).exists():
        return _factory_batches(spec, keys, inputs, num_batches, what, targets)
    data = load_dataset(spec, keys, inputs, what, targets)
    total = -(-data.length // batch_size)
    count = min(total, num_batches) if num_batches else total

    def gen() -> Iterator[dict[str, np.ndarray]]:
        for i in range(count):
            yield data.batch(i * batch_size, (i + 1) * batch_size)

    return count, gen()


def _factory_batches(spec: str, keys: dict[str, str], inputs: list[InputSpec], num_batches: int | None,
                     what: str, targets: str | None) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
    factory = load_callable(spec, f"{what}.data", DataError)
    try:
        source = iter(factory())
    except Exception as exc:
        raise DataError(f"{what}.data {spec} failed: {type(exc).__name__}: {exc}") from exc

    def gen() -> Iterator[dict[str, np.ndarray]]:
        for index, item in enumerate(source):
            if num_batches and index >= num_batches:
                return
            if not isinstance(item, Mapping):
                raise DataError(f"{what}.data {spec} yielded {type(item).__name__}, not a dict of arrays")
            absent = [(i.name, keys.get(i.name, i.name)) for i in inputs if keys.get(i.name, i.name) not in item]
            if absent:
                name, array = absent[0]
                mapped = f" ({what}.keys maps {name!r} to it)" if array != name else ""
                raise DataError(f"{what} batch {index}: no array {array!r} for input {name!r}{mapped}; "
                                f"it has {sorted(map(str, item))}")
            if targets is not None and targets not in item:
                raise DataError(f"{what} batch {index}: no array {targets!r} for the targets ({what}.targets); "
                                f"it has {sorted(map(str, item))}")
            batch = {i.name: np.asarray(item[keys.get(i.name, i.name)]) for i in inputs}
            check_batch(batch, inputs, f"{what} batch {index}")
            if targets is not None:
                batch[TARGET_COLUMN] = np.asarray(item[targets])
            yield batch

    return (num_batches or 0), gen()


def to_tensors(batch: Mapping[str, np.ndarray], inputs: list[InputSpec]) -> tuple:
    import torch

    return tuple(torch.from_numpy(np.require(batch[i.name], NUMPY_DTYPES[i.dtype], ["C", "W"])) for i in inputs)
