"""The input dtypes a recipe may declare, by name, and their numpy types (no torch: the schema uses it)."""

from __future__ import annotations

import numpy as np

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}
