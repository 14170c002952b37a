"""What `tune` measures on each trial's ONNX model in ONNX Runtime, and whether the goal is met.

The data (the recipe's evaluation data, else its calibration data) and the fp32 PyTorch outputs
are read once and kept: every trial runs the same batches. The goal is `max_drop` (fp32 metric
minus the int8 ONNX model's, in the metric's own units: the recipe's evaluation metric, or a
user callable `(outputs, targets) -> score`, higher better) or `min_sqnr_db` (the int8 ONNX
model's output SQNR against fp32, the worst output's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quantcli.errors import RecipeError
from quantcli.loading.data import TARGET_COLUMN, iter_batches, to_tensors
from quantcli.onnx import runtime
from quantcli.recipe import Recipe
from quantcli.report.metrics import METRICS
from quantcli.report.parity import Powers


GAIN_DB = 1.0  # less output SQNR gain than this does not justify changing a layer


@dataclass(frozen=True)
class Goal:
    max_drop: float | None = None
    min_sqnr_db: float | None = None

    def __post_init__(self) -> None:
        if (self.max_drop is None) == (self.min_sqnr_db is None):
            raise RecipeError("tune needs exactly one goal", "pass --max-drop X or --min-sqnr DB")

    def met(self, measured: dict[str, Any]) -> bool:
        if self.max_drop is not None:
            return measured["drop"] <= self.max_drop + 1e-12
        return measured["sqnr_db"] >= self.min_sqnr_db

    def better(self, new: dict[str, Any], old: dict[str, Any]) -> bool:
        """Whether `new` is worth a changed layer over `old`: a smaller metric drop (under --max-drop), or
        the same drop and an output SQNR higher by at least GAIN_DB (under --min-sqnr: that alone)."""
        if self.max_drop is not None and new["drop"] != old["drop"]:
            return new["drop"] < old["drop"]
        return new["sqnr_db"] >= old["sqnr_db"] + GAIN_DB

    def to_json(self) -> dict[str, float]:
        return {"max_drop": self.max_drop} if self.max_drop is not None else {"min_sqnr_db": self.min_sqnr_db}


class Judge:
    """Measures ONNX models on fixed data against the fp32 program's outputs."""

    def __init__(self, recipe: Recipe, float_program: Any, goal: Goal, metric: Callable | None = None,
                 batches: int | None = None):
        from quantcli import _torch
        from quantcli.loading.files import reader

        what = "evaluation" if recipe.evaluation is not None else "calibration"
        section = getattr(recipe, what)
        if goal.max_drop is not None and (what != "evaluation" or (metric is None and not section.metric)):
            raise RecipeError("--max-drop needs an evaluation: section with data, targets and a metric",
                              "add one, or use --min-sqnr DB")
        self.metric_name = None if goal.max_drop is None else ("callable" if metric else section.metric)
        targets = section.targets if self.metric_name else None
        needs = self.metric_name == "callable" or (self.metric_name and METRICS[self.metric_name].needs_targets)
        _, stream = iter_batches(section.data, section.keys, recipe.inputs, section.batch_size, batches, what,
                                 targets=targets if needs else None, files=reader(recipe, what, targets=bool(needs)))
        module = float_program.module()
        self.batches: list[dict[str, np.ndarray]] = []
        self.targets: list[Any] = []
        self.fp32: list[list[np.ndarray]] = []
        for batch in stream:
            self.targets.append(batch.pop(TARGET_COLUMN, None))
            with _torch.torch.no_grad():
                result = module(*to_tensors(batch, recipe.inputs))
            self.fp32.append([t.numpy() for _, t in _torch.output_leaves(result)])
            self.batches.append(batch)
        self.section, self.goal, self.callable = what, goal, metric
        self.fp32_metric = self._score([out[0] for out in self.fp32]) if self.metric_name else None

    def _score(self, outputs: list[np.ndarray]) -> float:
        if self.callable is not None:
            targets = np.concatenate(self.targets) if self.targets[0] is not None else None
            try:
                return float(self.callable(np.concatenate(outputs), targets))
            except Exception as exc:
                raise RecipeError(f"--metric failed: {type(exc).__name__}: {exc}") from exc
        acc = METRICS[self.metric_name].accumulator()
        for out, ref, target in zip(outputs, self.fp32, self.targets):
            acc.update(out, ref[0], target)
        return float(acc.result()["value"])

    def measure(self, onnx_path: Path) -> dict[str, Any]:
        """{"metric", "drop" (under --max-drop), "sqnr_db", "latency_ms"} of the ONNX model at `onnx_path`."""
        sess = runtime.session(onnx_path)
        powers: list[Powers] = [Powers() for _ in self.fp32[0]]
        firsts = []
        for batch, ref in zip(self.batches, self.fp32):
            outs = runtime.run(sess, batch)
            for p, r, o in zip(powers, ref, outs):
                p.add(r, o)
            firsts.append(outs[0])
        result: dict[str, Any] = {"sqnr_db": min(p.db() for p in powers)}
        if self.metric_name:
            result["metric"] = round(self._score(firsts), 6)
            result["drop"] = round(self.fp32_metric - result["metric"], 6)
        result["latency_ms"] = runtime.latency_ms(sess, self.batches[0], runs=10, warmup=2)
        return result
