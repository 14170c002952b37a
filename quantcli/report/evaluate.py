"""Accuracy, size and ONNX Runtime latency of the fp32 model and the int8 ONNX, from the evaluation section."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


from quantcli.loading.data import TARGET_COLUMN, iter_batches, to_tensors
from quantcli.onnx import export as onnx_export
from quantcli.onnx import runtime
from quantcli.recipe import Recipe


def _predictions(output: Any) -> Any:
    return output.argmax(-1)


def evaluate(recipe: Recipe, float_program: Any, int8_path: Path, io: dict[str, list[str]]) -> dict[str, Any]:
    """fp32 (PyTorch and ONNX) and int8 ONNX accuracy on the held-out data; sizes; median latency.

    The data streams batch by batch (an .npz, a folder of .npy files or a callable), so memory
    stays bounded by a batch; each batch goes through the three models once.
    """
    import onnx

    from quantcli import _torch
    torch = _torch.torch

    from quantcli import _torch

    section = recipe.evaluation
    _, batches = iter_batches(section.data, section.keys, recipe.inputs, section.batch_size, None, "evaluation",
                              targets=section.targets)
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        model = onnx_export.to_onnx(float_program, opset=recipe.export.opset, input_names=io["inputs"],
                                    output_names=io["outputs"])
        onnx_export.strip_node_metadata(model)  # as in the int8 file, so the sizes compare like for like
        onnx.save(model, str(float_path))
        sessions = {"fp32_onnx": runtime.session(float_path), "int8_onnx": runtime.session(int8_path)}
        module = float_program.module()
        correct = {"fp32_torch": 0, "fp32_onnx": 0, "int8_onnx": 0}
        samples, first = 0, None
        for batch in batches:
            targets = batch.pop(TARGET_COLUMN)
            first = first or batch
            with torch.no_grad():
                logits = _torch.output_leaves(module(*to_tensors(batch, recipe.inputs)))[0][1].numpy()
            correct["fp32_torch"] += int((_predictions(logits) == targets).sum())
            for name, sess in sessions.items():
                correct[name] += int((_predictions(runtime.run(sess, batch)[0]) == targets).sum())
            samples += len(targets)
        result = {"metric": section.metric, "samples": samples,
                  **{name: round(n / samples, 5) for name, n in correct.items()},
                  "size_bytes": {"fp32_onnx": float_path.stat().st_size, "int8_onnx": int8_path.stat().st_size},
                  "ort_latency": _latency(sessions, first, section.batch_size)}
    result["accuracy_drop_points"] = round(100 * (result["fp32_torch"] - result["int8_onnx"]), 3)
    return result


def _latency(sessions: dict[str, Any], batch: dict[str, Any], size: int) -> dict[str, dict[str, float]]:
    """Median ORT latency of the fp32 and int8 models at batch 1 and the evaluation batch size."""
    latency = {}
    for n in sorted({1, min(size, len(next(iter(batch.values()))))}):
        part = {k: v[:n] for k, v in batch.items()}
        latency[f"batch_{n}"] = {"fp32_ms": runtime.latency_ms(sessions["fp32_onnx"], part),
                                 "int8_ms": runtime.latency_ms(sessions["int8_onnx"], part)}
    return latency
