"""What a recipe's data files hold, from their array headers alone: names, dtypes, shapes.

`validate` (no torch, no numpy: well under a second) and the first stage that reads a section use it, so that
an array the file lacks, an unsafe dtype or a wrong shape fails before any work, not at export.
Only the headers are read: an .npz member's first bytes through `zipfile`, an .npy file's first
bytes. Data callables ("file.py:callable") are user code and are not run here; text, tables and
image folders are checked by loading.file_checks.
"""

from __future__ import annotations

import ast
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from quantcli.errors import DataError, InputError
from quantcli.loading import kinds
from quantcli.loading.array_checks import dtype_problem, missing_array, role_of, shape_problem
from quantcli.loading.dtypes import Dtype, from_descr
from quantcli.loading.targets import problem as target_problem
from quantcli.recipe import InputSpec, Recipe
from quantcli.references import exists

SECTIONS = ("calibration", "training", "evaluation")


MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class Header:
    dtype: Dtype
    shape: tuple[int, ...]


def _read_header(fh: IO[bytes]) -> Header:
    """The dtype and shape of an .npy file from its header: the magic, a version, a length and a Python
    dict literal ({'descr': '<f4', 'fortran_order': False, 'shape': (8, 3)}), as numpy.lib.format writes it."""
    magic = fh.read(8)
    if len(magic) < 8 or magic[:6] != MAGIC:
        raise ValueError("not an .npy array (bad magic string)")
    major = magic[6]
    if major not in (1, 2, 3):
        raise ValueError(f"unsupported .npy format version {major}.{magic[7]}")
    size_format = "<H" if major == 1 else "<I"
    raw = fh.read(struct.calcsize(size_format))
    if len(raw) < struct.calcsize(size_format):
        raise EOFError("the .npy header is truncated")
    (length,) = struct.unpack(size_format, raw)
    text = fh.read(length)
    if len(text) < length:
        raise EOFError("the .npy header is truncated")
    try:
        header = ast.literal_eval(text.decode("utf-8" if major == 3 else "latin1"))
        shape = tuple(int(n) for n in header["shape"])
        return Header(from_descr(header["descr"]), shape)
    except (SyntaxError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot parse the .npy header: {exc}") from None


def headers(path: Path) -> dict[str, Header]:
    """Array name -> header for an .npz file or a folder of .npy files; raises ValueError/OSError."""
    if path.is_dir():
        found = {}
        for file in sorted(path.glob("*.npy")):
            with open(file, "rb") as fh:
                found[file.stem] = _read_header(fh)
        if not found:
            raise ValueError("the folder holds no .npy files")
        return found
    with zipfile.ZipFile(path) as archive:
        found = {}
        for name in archive.namelist():
            if name.endswith(".npy"):
                with archive.open(name) as fh:
                    found[name[:-4]] = _read_header(fh)
        return found


def source_problems(section: str, source: Any, inputs: list[InputSpec] | None) -> list[str]:
    """Every problem the headers of one section's file source show (none for a callable)."""
    path = Path(source.data)
    if not exists(path) or inputs is None:
        return []  # a missing file is reported as such (references.file_problems); inputs come at capture
    kind = kinds.by_name(source.data)
    if kind not in ("arrays", "folder") or (kind == "folder" and kinds.of_folder(path) != "arrays"):
        return []  # callables are user code, text and images are read by loading.files
    try:
        found = headers(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        what = "" if path.is_dir() else " as .npz"  # the loader's wording (data.open_arrays)
        return [f"{section}: cannot read {path}{what}: {exc}"]
    problems, lengths = [], {}
    for spec in inputs:
        array = source.keys.get(spec.name, spec.name)
        header = found.get(array)
        if header is None:
            problems.append(missing_array(section, array, found, role_of(spec.name, array, section)))
            continue
        lengths[array] = header.shape[0] if header.shape else 0
        problem = shape_problem(spec, header.shape) or dtype_problem(spec, header.dtype, array)
        if problem is not None:
            problems.append(f"{section}: {problem}")
    targets = getattr(source, "targets", None)
    if targets is not None:
        if targets not in found:
            problems.append(missing_array(section, targets, found, f"for the targets, {section}.targets"))
        else:
            lengths[targets] = found[targets].shape[0] if found[targets].shape else 0
            problems += _target_problems(source, found[targets])
    if len(set(lengths.values())) > 1:
        problems.append(f"{section}: arrays disagree on the number of samples: {lengths}")
    elif lengths and not next(iter(lengths.values())):
        problems.append(f"{section}: the data holds no samples")
    return problems


def _target_problems(source: Any, header: Header) -> list[str]:
    """The evaluation targets' form for a class-index metric (accuracy), from the header."""
    from quantcli.numerics.names import METRICS

    metric = getattr(source, "metric", None)
    axes = METRICS[metric].target_axes if metric in METRICS else None
    found = None if axes is None else target_problem(header.shape, header.dtype, axes, metric)
    return [] if found is None else [found]


def data_problems(recipe: Recipe, sections: tuple[str, ...] = SECTIONS) -> list[str]:
    """The header problems of every file source among `sections` of a (path-resolved) recipe."""
    problems = []
    for name in sections:
        source = getattr(recipe, name)
        if source is not None:
            problems += source_problems(name, source, recipe.inputs)
    return problems


def check_sources(recipe: Recipe, sections: tuple[str, ...] = SECTIONS, error: type[InputError] = DataError) -> None:
    """Raise `error` listing every problem the data headers of `sections` show, before any work."""
    problems = data_problems(recipe, sections)
    if problems:
        raise error("; ".join(problems), "fix the data or the recipe; `quantcli validate` checks both")
