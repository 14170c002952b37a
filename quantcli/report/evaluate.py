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


def evaluate(recipe: Recipe, float_program: Any, int8_path: Path, io: dict[str, list[str]]) -> dict[str, Any]:
    """The metric of fp32 (PyTorch and ONNX) and int8 ONNX on the held-out data; sizes; median latency."""
    section = recipe.evaluation
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        model = onnx_export.to_onnx(
            float_program, opset=recipe.export.opset, input_names=io["inputs"], output_names=io["outputs"]
        )
        onnx_export.tidy(model)  # as the int8 file is written, so the sizes compare like for like
        external.save(model, float_path, keep=False)
        del model  # the sessions read the file: a large model's tensors are not held twice
        sessions = {"fp32_onnx": runtime.session(float_path), "int8_onnx": runtime.session(int8_path)}
        scores = Scores(section.metric, MODELS)
        _, batches = stream(recipe, "evaluation", float_program.module(), metric=section.metric)
        first = None
        for batch, fp32, target in batches:
            first = first or batch
            scores.reference(fp32, target)
            for name, sess in sessions.items():
                scores.add(name, runtime.run(sess, batch), fp32, target)
        result = {
            **scores.result(),
            "size_bytes": {"fp32_onnx": external.file_bytes(float_path), "int8_onnx": external.file_bytes(int8_path)},
            "ort_latency": _latency(sessions, first, section.batch_size),
        }
    return result


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
