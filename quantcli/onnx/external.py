"""Models over protobuf's 2 GB limit: every tensor in one external data file beside the model.

A model whose tensors hold more than `LIMIT_BYTES` is saved as `model.onnx` (the graph, tensors by
reference) plus `model.onnx.data` (quantcli.artifacts.data_path): one protobuf cannot hold it, and
onnx.checker and shape inference can then only read it from its file. ONNX Runtime and `onnx.load`
find the data file beside the model by itself, so what reads a model by its path (parity, the report's
taps, fusion analysis, inspect, tune) needs nothing more.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from quantcli.artifacts import data_path
from quantcli.errors import ModelError

LIMIT_BYTES = 2**31 - 2**27  # 1.875 GiB of tensors: what is left of protobuf's 2 GiB holds the graph
# Tensors under this stay in the model: shape inference's data propagation reads the small constants (an
# Unsqueeze's axes, a Reshape's shape) and cannot read them from the data file.
INLINE_BYTES = 1024


def tensor_bytes(model: Any) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer)


def save(model: Any, path: Path, limit: int = LIMIT_BYTES, keep: bool = True) -> bool:
    """Save `model` at `path`, with external data when its tensors exceed `limit`; whether it did.
    The model in memory keeps its tensors either way, unless `keep` is False: then a model saved with external
    data is left referring to the data file (a caller done with it need not read 2 GB back)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    data_path(path).unlink(missing_ok=True)
    if tensor_bytes(model) <= limit:
        onnx.save(model, str(path))
        return False
    onnx.save(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_path(path).name,
        size_threshold=INLINE_BYTES,
    )
    shutil.copymode(path, data_path(path))  # onnx writes the data file for its owner only; it goes with the model
    if keep:
        load_external_data_for_model(model, str(path.parent))  # saving moved the tensors out of the proto
    return True


def checked(model: Any, path: Path, limit: int = LIMIT_BYTES) -> Any:
    """Check `model`, infer its shapes (strictly, with data propagation) and save it at `path`; the inferred model.
    A model with external data is checked and inferred from its file, as one protobuf cannot hold it."""
    import onnx

    from quantcli.onnx.export import check, infer_shapes

    if tensor_bytes(model) <= limit:
        check(model)
        model = infer_shapes(model)
        save(model, path, limit)
        return model
    save(model, path, limit, keep=False)  # what is returned is read from the file
    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"the exported ONNX model fails onnx.checker or shape inference: {first}") from exc
    return onnx.load(str(path))


def file_bytes(path: Path) -> int:
    """The bytes a model takes on disk: its file and its external data file, if any."""
    data = data_path(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
