"""The input dtypes a recipe may declare, by name, and the one casting policy, without numpy.

The names are numpy's (`np.dtype(name)` gives the array type), so the schema and `validate` need no
numpy: the policy reads only a dtype's kind and item size, which numpy dtypes and the `.npy` header
dtypes of `loading.headers` both carry.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Dtype:
    """A dtype as an `.npy` header describes it: numpy's kind letter, item size and name."""

    kind: str  # b bool, i int, u uint, f float, c complex, U/S strings, O object, V structured, M/m datetime
    itemsize: int
    name: str

    def __str__(self) -> str:
        return self.name


_KIND_NAMES = {"b": "bool", "i": "int", "u": "uint", "f": "float", "c": "complex"}
_NATIVE = "<" if sys.byteorder == "little" else ">"


def from_descr(descr: Any) -> Dtype:
    """The Dtype of an `.npy` header's `descr` ('<f4', '|b1', '<U5', or a list for a structured dtype),
    named as numpy names it (`str(np.dtype(descr))`)."""
    if not isinstance(descr, str):
        return Dtype("V", 0, str(descr))
    order, kind, rest = descr[0], descr[1:2], descr[2:]
    digits = rest.split("[")[0]  # datetimes carry a unit: '<M8[ns]'
    itemsize = int(digits) * (4 if kind == "U" else 1) if digits.isdigit() else 0  # 'U': characters of 4 bytes
    native = order in ("|", "=", _NATIVE)
    if kind in _KIND_NAMES and native:
        bits = "" if kind == "b" else str(8 * itemsize)
        return Dtype(kind, itemsize, _KIND_NAMES[kind] + bits)
    if kind in ("M", "m") and native:
        return Dtype(kind, itemsize, ("datetime64" if kind == "M" else "timedelta64") + rest[len(digits) :])
    return Dtype(kind, itemsize, "object" if kind == "O" else descr)


DTYPES: dict[str, Dtype] = {
    name: Dtype(kind, size, name)
    for name, kind, size in (
        ("float32", "f", 4),
        ("float16", "f", 2),
        ("int64", "i", 8),
        ("int32", "i", 4),
        ("bool", "b", 1),
    )
}

SAME, SAFE, RANGE, UNSAFE = "same", "safe", "range", "unsafe"


def cast_kind(have: Any, want: Any) -> str:
    """How data of dtype `have` may feed an input declared `want` (numpy dtypes or `Dtype`s).

    SAME: nothing to do. SAFE: cast, the values are what the user meant (numpy's float64 default to
    float32, integers or booleans to a float input, a widening such as int32 ids to int64). RANGE:
    an integer narrowing (int64 to int32), safe only when every value fits, so it is checked on the
    values. UNSAFE: a cast would change the values' meaning (floats to token ids, anything to bool,
    strings, objects).
    """
    if str(have) == str(want):
        return SAME
    if want.kind == "f" and have.kind in "biuf":
        return SAFE
    if want.kind in "iu" and have.kind in "biu":
        return SAFE if _widens(have, want) else RANGE
    return UNSAFE


def _widens(have: Any, want: Any) -> bool:
    """numpy's can_cast(have, want, "safe") for booleans and integers."""
    if have.kind == "b":
        return True
    if have.kind == want.kind:
        return want.itemsize >= have.itemsize
    return have.kind == "u" and want.itemsize > have.itemsize  # uint to a wider int
