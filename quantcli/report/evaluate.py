"""Accuracy, size and ONNX Runtime latency of the fp32 model and the int8 ONNX, from the evaluation section."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


from quantcli.loading.data import TARGETS, Dataset, load_dataset, to_tensors
from quantcli.onnx import export as onnx_export
from quantcli.onnx import runtime
from quantcli.recipe import Recipe


def _batches(data: Dataset, size: int):
    for start in range(0, data.length, size):
        yield data.batch(start, start + size)


def accuracy_torch(module: Any, data: Dataset, recipe: Recipe, size: int) -> float:
    import torch

    correct = 0
    with torch.no_grad():
        for batch in _batches(data, size):
            logits = torch.utils._pytree.tree_flatten(module(*to_tensors(batch, recipe.inputs)))[0][0]
            correct += int((logits.argmax(-1).numpy() == batch[TARGETS]).sum())
    return round(correct / data.length, 5)


def accuracy_onnx(sess: Any, data: Dataset, size: int) -> float:
    correct = 0
    for batch in _batches(data, size):
        logits = runtime.run(sess, batch)[0]
        correct += int((logits.argmax(-1) == batch[TARGETS]).sum())
    return round(correct / data.length, 5)


def evaluate(recipe: Recipe, float_program: Any, int8_path: Path, io: dict[str, list[str]]) -> dict[str, Any]:
    """fp32 (PyTorch and ONNX) and int8 ONNX accuracy on the held-out split; sizes; median latency."""
    section = recipe.evaluation
    data = load_dataset(section.data, section.keys, recipe.inputs, "evaluation", targets=section.targets)
    size = section.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        model = onnx_export.to_onnx(float_program, opset=recipe.export.opset, input_names=io["inputs"],
                                    output_names=io["outputs"])
        onnx_export.strip_node_metadata(model)  # as in the int8 file, so the sizes compare like for like
        import onnx

        onnx.save(model, str(float_path))
        float_sess, int8_sess = runtime.session(float_path), runtime.session(int8_path)
        result = {
            "metric": section.metric,
            "samples": data.length,
            "fp32_torch": accuracy_torch(float_program.module(), data, recipe, size),
            "fp32_onnx": accuracy_onnx(float_sess, data, size),
            "int8_onnx": accuracy_onnx(int8_sess, data, size),
            "size_bytes": {"fp32_onnx": float_path.stat().st_size, "int8_onnx": int8_path.stat().st_size},
        }
        latency = {}
        for n in sorted({1, size}):
            batch = {k: v for k, v in data.batch(0, n).items() if k != TARGETS}
            latency[f"batch_{n}"] = {"fp32_ms": runtime.latency_ms(float_sess, batch),
                                     "int8_ms": runtime.latency_ms(int8_sess, batch)}
        result["ort_latency"] = latency
    result["accuracy_drop_points"] = round(100 * (result["fp32_torch"] - result["int8_onnx"]), 3)
    return result
