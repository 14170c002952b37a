"""The input dtypes a recipe may declare, by name, their numpy types, and the one casting policy.

No torch here: the schema and `validate` use it.
"""

from __future__ import annotations

import numpy as np

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}

SAME, SAFE, RANGE, UNSAFE = "same", "safe", "range", "unsafe"


def cast_kind(have: np.dtype, want: np.dtype) -> str:
    """How data of dtype `have` may feed an input declared `want`.

    SAME: nothing to do. SAFE: cast, the values are what the user meant (numpy's float64 default to
    float32, integers or booleans to a float input, a widening such as int32 ids to int64). RANGE:
    an integer narrowing (int64 to int32), safe only when every value fits, so it is checked on the
    values. UNSAFE: a cast would change the values' meaning (floats to token ids, anything to bool,
    strings, objects).
    """
    have, want = np.dtype(have), np.dtype(want)
    if have == want:
        return SAME
    numeric = have.kind in "biuf"
    if want.kind == "f" and numeric:
        return SAFE
    if want.kind in "iu" and have.kind in "biu":
        return SAFE if np.can_cast(have, want, "safe") else RANGE
    return UNSAFE
