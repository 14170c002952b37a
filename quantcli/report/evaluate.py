"""The evaluation section's metric, size and ONNX Runtime latency of the fp32 model and the int8 ONNX.

The metric comes from the registry (quantcli.report.metrics) by name: accuracy, token accuracy, or
cosine similarity to the fp32 PyTorch model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


from quantcli.loading.data import TARGET_COLUMN, iter_batches, to_tensors
from quantcli.onnx import export as onnx_export
from quantcli.onnx import runtime
from quantcli.recipe import Recipe
from quantcli.report.metrics import METRICS, summarize

MODELS = ("fp32_torch", "fp32_onnx", "int8_onnx")


def evaluate(recipe: Recipe, float_program: Any, int8_path: Path, io: dict[str, list[str]]) -> dict[str, Any]:
    """The metric of fp32 (PyTorch and ONNX) and int8 ONNX on the held-out data; sizes; median latency.

    The data streams batch by batch (an .npz, a folder of .npy files, a callable, text or image
    files), so memory stays bounded by a batch; each batch goes through the three models once.
    """
    import onnx

    from quantcli import _torch
    from quantcli.loading.files import reader

    torch = _torch.torch

    section = recipe.evaluation
    metric = METRICS[section.metric]
    targets = section.targets if metric.needs_targets else None
    _, batches = iter_batches(section.data, section.keys, recipe.inputs, section.batch_size, None, "evaluation",
                              targets=targets, files=reader(recipe, "evaluation", targets=metric.needs_targets))
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        model = onnx_export.to_onnx(float_program, opset=recipe.export.opset, input_names=io["inputs"],
                                    output_names=io["outputs"])
        onnx_export.strip_node_metadata(model)  # as in the int8 file, so the sizes compare like for like
        onnx.save(model, str(float_path))
        sessions = {"fp32_onnx": runtime.session(float_path), "int8_onnx": runtime.session(int8_path)}
        module = float_program.module()
        scores = {name: metric.accumulator() for name in MODELS}
        samples, first = 0, None
        for batch in batches:
            target = batch.pop(TARGET_COLUMN, None)
            first = first or batch
            with torch.no_grad():
                reference = _torch.output_leaves(module(*to_tensors(batch, recipe.inputs)))[0][1].numpy()
            scores["fp32_torch"].update(reference, reference, target)
            for name, sess in sessions.items():
                scores[name].update(runtime.run(sess, batch)[0], reference, target)
            samples += len(reference)
        result = {"metric": section.metric, "samples": samples,
                  **summarize(section.metric, {name: acc.result() for name, acc in scores.items()}),
                  "size_bytes": {"fp32_onnx": float_path.stat().st_size, "int8_onnx": int8_path.stat().st_size},
                  "ort_latency": _latency(sessions, first, section.batch_size)}
    return result


def _latency(sessions: dict[str, Any], batch: dict[str, Any], size: int) -> dict[str, dict[str, float]]:
    """Median ORT latency of the fp32 and int8 models at batch 1 and the evaluation batch size."""
    latency = {}
    for n in sorted({1, min(size, len(next(iter(batch.values()))))}):
        part = {k: v[:n] for k, v in batch.items()}
        latency[f"batch_{n}"] = {"fp32_ms": runtime.latency_ms(sessions["fp32_onnx"], part),
                                 "int8_ms": runtime.latency_ms(sessions["int8_onnx"], part)}
    return latency
