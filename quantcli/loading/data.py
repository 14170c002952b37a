"""Data sources for calibration, training and evaluation, and batching: the one loading path.

A source is one of:
- an .npz file: arrays named after the inputs (or mapped by `keys`), first axis = samples;
- a folder of .npy files (`<array>.npy`), memory-mapped so memory stays bounded by a batch;
- "file.py:callable" (or "package.module:callable"): called with no arguments, it returns an
  iterable of dicts of arrays, each dict one batch keyed by input name (or mapped by `keys`).

Every batch of every source and section passes `conform` before anyone uses it: the dtype policy
(`dtypes.cast_kind`: a safe cast applied and said once, an unsafe one refused), finite values,
one sample count. So calibration, the capture example, the export parity sample, evaluation and
training all see the same arrays, and bad data is an input error where it is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.errors import DataError
from quantcli.loading.array_checks import array_note, dtype_problem, missing_array, role_of, shape_problem
from quantcli.loading.dtypes import RANGE, SAME, cast_kind
from quantcli.loading.factory import load_callable
from quantcli.recipe import InputSpec
from quantcli.references import split_callable

log = logging.getLogger("quantcli")

TARGET_COLUMN = "__targets__"  # the targets' column in a batch, beside the inputs


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
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{what}: cannot read {path} as .npz: {exc}") from None
    if not isinstance(arrays, Mapping):  # a single .npy file
        raise DataError(f"{what}: {path} is one array, not an .npz file or a folder of .npy files")
    return arrays


def _get(arrays: Mapping[str, Any], name: str, what: str, role: str) -> np.ndarray:
    if name not in arrays:
        raise DataError(missing_array(what, name, arrays, role))
    try:
        return arrays[name]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{what}: cannot read array {name!r}: {exc}") from None


def check_batch(batch: Mapping[str, Any], inputs: list[InputSpec], what: str, sample_axis: bool = True) -> None:
    """Check every input is present with the rank, static dimensions and bounds the recipe declares."""
    for spec in inputs:
        if spec.name not in batch:
            raise DataError(f"{what}: no array for input {spec.name!r}; got {sorted(batch)}")
        problem = shape_problem(spec, np.shape(batch[spec.name]), sample_axis)
        if problem is not None:
            raise DataError(f"{what}: {problem}")


# ------------------------------------------------------------------ values: dtype, finite, counts
@dataclass
class Where:
    """Where a batch comes from, for messages: the section, the batch index, the rows of the data."""

    what: str
    batch: int | None  # None: a scan of the whole source, not one of its batches
    rows: Sequence[int] | None = None  # the data's sample index of each row; None: a factory's batch
    arrays: dict[str, str] = field(default_factory=dict)  # input name -> array name
    said: set[str] = field(default_factory=set)  # notes already logged for this source

    def note(self, message: str) -> None:
        """Log a notice once per source (the console also prints each message once per command)."""
        if message not in self.said:
            self.said.add(message)
            log.warning(message)

    def label(self) -> str:
        return self.what if self.batch is None else f"{self.what} batch {self.batch}"

    def sample(self, row: int) -> str:
        if self.rows is None:
            return f"sample {row} of that batch"
        return f"sample {int(self.rows[row])} of the data"


def conform(batch: dict[str, np.ndarray], inputs: list[InputSpec], where: Where) -> dict[str, np.ndarray]:
    """The batch with the recipe's dtypes, or a DataError naming the input, the batch and the sample.

    Checks one sample count across arrays, no empty batch, the dtype policy (a safe cast is applied
    and noted; integer narrowing only when the values fit), and finite floats after the cast (a
    float64 value too large for float16 becomes Inf and is caught here too).
    """
    counts = {name: (np.shape(a)[0] if np.ndim(a) else 0) for name, a in batch.items()}
    if len(set(counts.values())) > 1:
        shown = {("targets" if k == TARGET_COLUMN else k): v for k, v in counts.items()}
        raise DataError(f"{where.label()}: arrays disagree on the number of samples: {shown}")
    if counts and not next(iter(counts.values())):
        raise DataError(f"{where.label()}: holds no samples")
    out = dict(batch)
    for spec in inputs:
        out[spec.name] = _cast(batch[spec.name], spec, where)
        _finite(
            out[spec.name],
            f"input {spec.name!r}{array_note(spec.name, where.arrays.get(spec.name, spec.name))} holds",
            where,
        )
    if TARGET_COLUMN in batch:
        _finite(batch[TARGET_COLUMN], "the targets hold", where)
    return out


def _cast(arr: np.ndarray, spec: InputSpec, where: Where) -> np.ndarray:
    want = np.dtype(spec.dtype)
    kind = cast_kind(arr.dtype, want)
    if kind == SAME:
        return arr
    array = where.arrays.get(spec.name, spec.name)
    problem = dtype_problem(spec, arr.dtype, array)
    if problem is not None:
        raise DataError(f"{where.what}: {problem}")
    if kind == RANGE and arr.size:
        info = np.iinfo(want)
        low, high = arr.min(), arr.max()
        if low < info.min or high > info.max:
            raise DataError(
                f"{where.label()}: input {spec.name!r}{array_note(spec.name, array)} is "
                f"{arr.dtype} with values in [{low}, {high}], outside the recipe's {want}",
                "declare the input as int64, or fix the data",
            )
    where.note(
        f"{where.what}: input {spec.name!r}{array_note(spec.name, array)} is {arr.dtype} in the data; "
        f"cast to {want}, the recipe's dtype"
    )
    with np.errstate(over="ignore"):  # a value too large for float16 becomes Inf, which _finite reports
        return arr.astype(want)


def _finite(arr: np.ndarray, label: str, where: Where) -> None:
    """Raise naming the first NaN or Inf, by batch and sample (a cheap isfinite on float arrays).

    `label` is the message's subject and verb: "input 'x' holds", "the targets hold"."""
    if not np.issubdtype(arr.dtype, np.floating):
        return
    bad = ~np.isfinite(arr)
    if not bad.any():
        return
    index = np.argwhere(bad)[0]
    value = arr[tuple(index)]
    kind = "NaN" if np.isnan(value) else "Inf"
    raise DataError(
        f"{where.label()}: {label} {kind} at {where.sample(int(index[0]))}",
        "quantization ranges need finite values: fix or drop that sample",
    )


# ------------------------------------------------------------------ indexed sources
@dataclass
class Dataset:
    """Arrays for the recipe's inputs (and optional targets), sliced into conformed batches on demand."""

    columns: dict[str, Any]  # input name (or TARGET_COLUMN) -> array-like, first axis = samples
    length: int
    inputs: list[InputSpec] = field(default_factory=list)
    what: str = "data"
    arrays: dict[str, str] = field(default_factory=dict)  # input name -> array name, for messages
    said: set[str] = field(default_factory=set)

    def batch(self, start: int, stop: int, index: int = 0) -> dict[str, np.ndarray]:
        """Samples start..stop, conformed; `index` names the batch in messages."""
        raw = {name: np.ascontiguousarray(arr[start:stop]) for name, arr in self.columns.items()}
        rows = range(start, min(stop, self.length))
        return conform(raw, self.inputs, Where(self.what, index, rows, self.arrays, self.said))

    def scan(self, chunk: int = 4096) -> None:
        """Check every sample (dtypes, finite values) before work starts, a chunk at a time."""
        for start in range(0, self.length, chunk):
            raw = {name: np.asarray(arr[start : start + chunk]) for name, arr in self.columns.items()}
            conform(
                raw,
                self.inputs,
                Where(self.what, None, range(start, min(start + chunk, self.length)), self.arrays, self.said),
            )

    def take(self, index: np.ndarray, batch: int = 0) -> dict[str, np.ndarray]:
        """The samples at `index` (in ascending order), conformed; `batch` names the batch (a step) in messages."""
        rows = np.sort(index)
        raw = {name: np.ascontiguousarray(arr[rows]) for name, arr in self.columns.items()}
        return conform(raw, self.inputs, Where(self.what, batch, rows, self.arrays, self.said))


def load_dataset(
    spec: str, keys: dict[str, str], inputs: list[InputSpec], what: str, targets: str | None = None, files: Any = None
) -> Dataset:
    """Open an .npz or .npy folder for `inputs`: names, sample counts, shapes and dtypes checked, no data read.

    `files` (loading.files.reader) reads text and image files instead.
    """
    if files is not None:
        return files.dataset()
    arrays = open_arrays(spec, what)
    names = {i.name: keys.get(i.name, i.name) for i in inputs}
    columns = {i.name: _get(arrays, names[i.name], what, role_of(i.name, names[i.name], what)) for i in inputs}
    if targets is not None:
        columns[TARGET_COLUMN] = _get(arrays, targets, what, f"for the targets, {what}.targets")
    lengths = {
        (targets if name == TARGET_COLUMN else names[name]): arr.shape[0] if arr.ndim else 0
        for name, arr in columns.items()
    }
    if len(set(lengths.values())) != 1:
        raise DataError(f"{what}: arrays disagree on the number of samples: {lengths}")
    length = next(iter(lengths.values()))
    if length == 0:
        raise DataError(f"{what}: the data holds no samples")
    check_batch({k: v for k, v in columns.items() if k != TARGET_COLUMN}, inputs, what)
    for spec in inputs:
        problem = dtype_problem(spec, columns[spec.name].dtype, names[spec.name])
        if problem is not None:
            raise DataError(f"{what}: {problem}")
    return Dataset(columns, length, inputs, what, names)


def iter_batches(
    spec: str,
    keys: dict[str, str],
    inputs: list[InputSpec],
    batch_size: int,
    num_batches: int | None,
    what: str,
    targets: str | None = None,
    files: Any = None,
) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
    """(number of batches, iterator of conformed input-name -> array batches); a final partial batch included.

    With `targets` (an array name), each batch also holds the targets under TARGET_COLUMN. The
    one loading path of calibration and evaluation data, whatever the source: `files` (made by
    loading.files.reader for text, tables and image folders) streams them preprocessed the model's
    way. Asking for more batches than the data holds, or a batch larger than the data, is said on stderr.
    """
    if files is not None:
        return files.iter_batches(batch_size, num_batches)
    if split_callable(spec) is not None and not Path(spec).exists():
        return _factory_batches(spec, keys, inputs, num_batches, what, targets)
    data = load_dataset(spec, keys, inputs, what, targets)
    total = -(-data.length // batch_size)
    count = min(total, num_batches) if num_batches else total
    if batch_size > data.length:
        log.warning(
            f"{what}: batch_size {batch_size} is larger than the data ({data.length} samples): "
            f"one batch of {data.length}"
        )
    elif num_batches and num_batches > total:
        log.warning(
            f"{what}: {num_batches} batches asked for, the data holds {total} ({data.length} samples at "
            f"batch_size {batch_size}): using {total}"
        )

    def gen() -> Iterator[dict[str, np.ndarray]]:
        for i in range(count):
            yield data.batch(i * batch_size, (i + 1) * batch_size, i)

    return count, gen()


def _factory_batches(
    spec: str, keys: dict[str, str], inputs: list[InputSpec], num_batches: int | None, what: str, targets: str | None
) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
    factory = load_callable(spec, f"{what}.data", DataError)
    try:
        source = iter(factory())
    except Exception as exc:
        raise DataError(f"{what}.data {spec} failed: {type(exc).__name__}: {exc}") from exc
    arrays = {i.name: keys.get(i.name, i.name) for i in inputs}
    said: set[str] = set()

    def gen() -> Iterator[dict[str, np.ndarray]]:
        index = -1
        for index, item in enumerate(source):
            if num_batches and index >= num_batches:
                return
            yield _factory_batch(item, Where(what, index, None, arrays, said), spec, inputs, targets)
        if index < 0:
            raise DataError(f"{what}.data {spec} yielded no batches")
        if num_batches and index + 1 < num_batches:
            log.warning(f"{what}: {num_batches} batches asked for, {spec} yielded {index + 1}: using {index + 1}")

    return (num_batches or 0), gen()


def _factory_batch(
    item: Any, where: Where, spec: str, inputs: list[InputSpec], targets: str | None
) -> dict[str, np.ndarray]:
    """One batch a data callable yielded, checked and conformed like a file's."""
    what, index, arrays = where.what, where.batch, where.arrays
    if not isinstance(item, Mapping):
        raise DataError(f"{what}.data {spec} yielded {type(item).__name__}, not a dict of arrays")
    absent = [(name, array) for name, array in arrays.items() if array not in item]
    if absent:
        name, array = absent[0]
        mapped = f" ({what}.keys maps {name!r} to it)" if array != name else ""
        raise DataError(
            f"{what} batch {index}: no array {array!r} for input {name!r}{mapped}; it has {sorted(map(str, item))}"
        )
    if targets is not None and targets not in item:
        raise DataError(
            f"{what} batch {index}: no array {targets!r} for the targets ({what}.targets); "
            f"it has {sorted(map(str, item))}"
        )
    batch = {i.name: np.asarray(item[arrays[i.name]]) for i in inputs}
    check_batch(batch, inputs, f"{what} batch {index}", sample_axis=False)
    if targets is not None:
        batch[TARGET_COLUMN] = np.asarray(item[targets])
    return conform(batch, inputs, where)


def is_callable_source(spec: str) -> bool:
    """Whether a data reference names a callable ("file.py:callable", "package.module:callable"), not a path."""
    return split_callable(spec) is not None and not Path(spec).exists()


class BatchDigest:
    """sha256 of a stream of conformed batches: each array's name, dtype, shape and bytes, in order.

    A data callable is user code whose output no file hash can vouch for: a stage reading one is
    keyed by this digest of what it yielded."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        for name in sorted(batch):
            arr = np.ascontiguousarray(batch[name])
            self._sha.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            self._sha.update(arr.reshape(-1).view(np.uint8) if arr.size else b"")

    def value(self) -> str:
        return "yields " + self._sha.hexdigest()


def samples_in(batch: Mapping[str, Any] | Sequence[Any]) -> int:
    """The number of samples in a conformed batch, by name or in forward() order (its first array's first axis)."""
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return int(np.shape(first)[0]) if np.ndim(first) else 1


def to_tensors(batch: Mapping[str, np.ndarray], inputs: list[InputSpec]) -> tuple:
    """The batch as torch tensors in forward() order (conformed batches already have the recipe's dtypes)."""
    import torch

    return tuple(torch.from_numpy(np.require(batch[i.name], i.dtype, ["C", "W"])) for i in inputs)
