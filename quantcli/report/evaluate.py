"""The export report's evaluation: the metric, size and ONNX Runtime latency of the fp32 model and the int8 ONNX.

The figures come from the one evaluator (quantcli.numerics.evaluate), which streams the evaluation
data: memory stays bounded by a batch; each batch goes through the three models once.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from quantcli.numerics.evaluate import Scores, stream
from quantcli.onnx import export as onnx_export
from quantcli.onnx import external, runtime
from quantcli.recipe import Recipe

MODELS = ("fp32_torch", "fp32_onnx", "int8_onnx")

# The fp32 ONNX files this process has exported, by the float program's file and the export's settings: the last
# CACHED_ONNX of them, each at most CACHED_ONNX_BYTES (larger ones are exported again). `quantcli tune` exports
# every trial's int8 model with the same float program, whose ONNX export took as long as the int8 model's.
_FLOAT_ONNX: dict[tuple[Any, ...], bytes] = {}
CACHED_ONNX = 2
CACHED_ONNX_BYTES = 256 * 2**20


def evaluate(
    recipe: Recipe,
    float_program: Any,
    int8_path: Path,
    io: dict[str, list[str]],
    float_file: Path,
    unfused: bool = False,
) -> dict[str, Any]:
    """The metric of fp32 (PyTorch and ONNX) and int8 ONNX on the held-out data; sizes; median latency.

    `float_file`: the file `float_program` was loaded from, whose fp32 ONNX a process exports once. `unfused`: the
    int8 model's metric with ORT's graph optimizations off, the target's arithmetic where this CPU saturates
    (stages.export.target_arithmetic); its latency is still this CPU's, optimized."""
    section = recipe.evaluation
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        _float_onnx(recipe, float_program, io, float_file, float_path)
        sessions = {"fp32_onnx": runtime.session(float_path), "int8_onnx": runtime.session(int8_path)}
        scored = {**sessions, "int8_onnx": runtime.session(int8_path, optimize=False)} if unfused else sessions
        scores = Scores(section.metric, MODELS)
        _, batches = stream(recipe, "evaluation", float_program.module(), metric=section.metric)
        first = None
        for batch, fp32, target in batches:
            first = first or batch
            scores.reference(fp32, target)
            for name, sess in scored.items():
                scores.add(name, runtime.run(sess, batch), fp32, target)
        result = {
            **scores.result(),
            "size_bytes": {"fp32_onnx": external.file_bytes(float_path), "int8_onnx": external.file_bytes(int8_path)},
            "ort_latency": _latency(sessions, first, section.batch_size),
            **({"int8_arithmetic": "unfused"} if unfused else {}),
        }
    return result


def _float_onnx(recipe: Recipe, float_program: Any, io: dict[str, list[str]], source: Path, path: Path) -> None:
    """Write the fp32 model's ONNX file at `path` (with external data where it needs it), as exported before from
    the same `source` file in this process where it was."""
    from quantcli._torch import file_identity

    key = (file_identity(source), recipe.export.opset, tuple(io["inputs"]), tuple(io["outputs"]))
    if key in _FLOAT_ONNX:
        path.write_bytes(_FLOAT_ONNX[key])
        return
    model = onnx_export.to_onnx(
        float_program, opset=recipe.export.opset, input_names=io["inputs"], output_names=io["outputs"]
    )
    onnx_export.tidy(model)  # as the int8 file is written, so the sizes compare like for like
    with_data_file = external.save(model, path, keep=False)
    del model  # the sessions read the file: a large model's tensors are not held twice
    if not with_data_file and path.stat().st_size <= CACHED_ONNX_BYTES:
        _FLOAT_ONNX[key] = path.read_bytes()
        while len(_FLOAT_ONNX) > CACHED_ONNX:
            del _FLOAT_ONNX[next(iter(_FLOAT_ONNX))]


def _latency(sessions: dict[str, Any], batch: dict[str, Any], size: int) -> dict[str, dict[str, float]]:
    """Median ORT latency of the fp32 and int8 models at batch 1 and the evaluation batch size."""
    latency = {}
    for n in sorted({1, min(size, len(next(iter(batch.values()))))}):
        part = {k: v[:n] for k, v in batch.items()}
        latency[f"batch_{n}"] = {
            "fp32_ms": runtime.latency_ms(sessions["fp32_onnx"], part),
            "int8_ms": runtime.latency_ms(sessions["int8_onnx"], part),
        }
    return latency
