"""The report's figures, summed batch by batch: per-layer SQNRs, whole-model output errors, the metric
(the one evaluator's `Scores`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from quantcli.numerics.evaluate import Scores
from quantcli.numerics.parity import Powers
from quantcli.recipe import Recipe
from quantcli.report.taps import Point, names

KINDS = ("local", "accumulated", "ort_vs_int8", "ort_vs_fp32")


class _Output:
    """One model output's error powers and largest absolute error, for int8 and ORT against fp32."""

    def __init__(self) -> None:
        self.powers = {k: Powers() for k in ("int8_vs_fp32", "ort_vs_fp32", "ort_vs_int8")}
        self.max_abs = {"int8": 0.0, "ort": 0.0}

    def add(self, kind: str, reference: np.ndarray, other: np.ndarray) -> None:
        self.powers[kind].add(reference, other)
        if kind.endswith("_vs_fp32"):
            who = kind.split("_vs_")[0]
            diff = np.abs(np.asarray(reference, np.float64) - np.asarray(other, np.float64))
            self.max_abs[who] = max(self.max_abs[who], float(diff.max()) if diff.size else 0.0)

    def result(self, ort: bool) -> dict[str, float]:
        doc = {"int8_vs_fp32_db": self.powers["int8_vs_fp32"].db(), "max_abs_error": round(self.max_abs["int8"], 6)}
        if ort:
            doc.update(
                {
                    "ort_vs_fp32_db": self.powers["ort_vs_fp32"].db(),
                    "ort_vs_int8_db": self.powers["ort_vs_int8"].db(),
                    "ort_max_abs_error": round(self.max_abs["ort"], 6),
                }
            )
        return doc


class Figures:
    """Accumulates a report over batches; `result()` gives its JSON document."""

    def __init__(self, found: list[Point], substituted: set[str], outputs: list[str], recipe: Recipe | None):
        self.points = found
        self.names = names(found)
        self.watch = sorted({p.node for p in found} | substituted)
        self.layer = {p.node: {k: Powers() for k in KINDS} for p in found}
        self.outputs = {name: _Output() for name in outputs}
        self.reproduce = Powers()
        metric = recipe.evaluation.metric if recipe is not None and recipe.evaluation is not None else None
        self.scores = Scores(metric, ("fp32_torch", "int8_torch", "int8_onnx")) if metric else None
        self.batches = self.samples = 0
        self.ort = False
        self._last: dict[str, Any] = {}

    def add_torch(
        self,
        fp32: list[np.ndarray],
        int8: list[np.ndarray],
        shipped: list[np.ndarray],
        ref: dict[str, Any],
        acc: dict[str, Any],
        local: dict[str, Any],
        target: Any,
    ) -> None:
        ref = {k: v.numpy() for k, v in ref.items()}
        acc = {k: v.numpy() for k, v in acc.items()}
        for node, powers in self.layer.items():
            powers["local"].add(ref[node], local[node].numpy())
            powers["accumulated"].add(ref[node], acc[node])
        for out, f, q, s in zip(self.outputs.values(), fp32, int8, shipped):
            out.add("int8_vs_fp32", f, s)
            self.reproduce.add(s, q)
        if self.scores:
            self.scores.reference(fp32, target)
            self.scores.add("int8_torch", shipped, fp32, target)
        self.batches += 1
        self.samples += int(np.shape(fp32[0])[0]) if np.ndim(fp32[0]) else 1
        self._last = {"fp32": fp32, "int8": shipped, "ref": ref, "acc": acc}

    def add_ort(self, outputs: list[np.ndarray], tapped: dict[str, np.ndarray], target: Any) -> None:
        """ORT's outputs and tapped layer values on the batch `add_torch` saw last."""
        self.ort = True
        last = self._last
        for node, value in tapped.items():
            self.layer[node]["ort_vs_int8"].add(last["acc"][node], value)
            self.layer[node]["ort_vs_fp32"].add(last["ref"][node], value)
        for out, f, q, o in zip(self.outputs.values(), last["fp32"], last["int8"], outputs):
            out.add("ort_vs_fp32", f, o)
            out.add("ort_vs_int8", q, o)
        if self.scores:
            self.scores.add("int8_onnx", outputs, last["fp32"], target)

    def _layer(self, p: Point) -> dict[str, Any]:
        powers = self.layer[p.node]
        doc = {
            "name": self.names[p.node],
            "node": p.node,
            "module": p.module,
            "module_type": p.module_type,
            "op": p.op,
            "depth": p.depth,
            "quantized_output": p.quantized_output,
            "local_db": powers["local"].db(),
            "accumulated_db": powers["accumulated"].db(),
        }
        if self.ort:
            tapped = powers["ort_vs_int8"].signal > 0 or powers["ort_vs_int8"].noise > 0
            doc["ort_vs_int8_db"] = powers["ort_vs_int8"].db() if tapped else None
            doc["ort_vs_fp32_db"] = powers["ort_vs_fp32"].db() if tapped else None
        return doc

    def result(self) -> dict[str, Any]:
        layers = [self._layer(p) for p in self.points]
        worst = sorted(layers, key=lambda d: (d["local_db"], d["depth"]))
        doc: dict[str, Any] = {
            "layers": layers,
            "worst": [d["name"] for d in worst],
            "model": {
                "outputs": {name: out.result(self.ort) for name, out in self.outputs.items()},
                "saved_vs_copy_db": self.reproduce.db(),
            },
        }
        if self.scores:  # the metric of fp32 and int8 (PyTorch, and ORT with --onnx), in the evaluator's keys
            doc["evaluation"] = self.scores.result()
        return doc
