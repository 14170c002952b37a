"""What `tune` measures on each trial's ONNX model in ONNX Runtime, and whether the goal is met.

Each measurement streams the data (the recipe's evaluation data, else its calibration data) through
the fp32 program and the trial's ONNX model with the one evaluator (quantcli.numerics.evaluate):
every trial sees the same batches, and nothing but a batch is held. The goal is `max_drop` (fp32
metric minus the int8 ONNX model's, in the metric's own units: the recipe's evaluation metric, or
a user callable `(outputs, targets) -> score`, higher better) or `min_sqnr_db` (the int8 ONNX
model's output SQNR against fp32, the worst output's).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcli.artifacts import report_path
from quantcli.errors import InputError, RecipeError
from quantcli.numerics.evaluate import Scores, stream
from quantcli.onnx import runtime
from quantcli.recipe import Recipe

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
    """Measures ONNX models on fixed data against the fp32 program's outputs, streaming it each time."""

    def __init__(
        self, recipe: Recipe, float_program: Any, goal: Goal, metric: Callable | None = None, batches: int | None = None
    ):
        what = "evaluation" if recipe.evaluation is not None else "calibration"
        section = getattr(recipe, what)
        if goal.max_drop is not None and (what != "evaluation" or (metric is None and not section.metric)):
            raise RecipeError(
                "--max-drop needs an evaluation: section with data, targets and a metric",
                "add one, or use --min-sqnr DB",
            )
        self.metric_name = None if goal.max_drop is None else ("callable" if metric else section.metric)
        self.recipe, self.module, self.limit = recipe, float_program.module(), batches
        self.section, self.goal, self.callable = what, goal, metric
        self.fp32_torch: float | None = None
        self.batches = 0

    def measure(self, onnx_path: Path) -> dict[str, Any]:
        """{"int8_onnx" (the metric) and "drop" under --max-drop, "sqnr_db", "latency_ms"} of the ONNX model: the
        metric on its target's arithmetic, as export judged it (unfused where this CPU saturates what the target
        computes exactly: stages.export.target_arithmetic), the latency this CPU's."""
        sess = runtime.session(onnx_path)
        report = json.loads(report_path(onnx_path).read_text())
        unfused = (report.get("u8s8") or {}).get("parity_arithmetic") == "unfused"
        scored = runtime.session(onnx_path, optimize=False) if unfused else sess
        scores = Scores(self.metric_name, ("fp32_torch", "int8_onnx"), self.callable)
        _, batches = stream(self.recipe, self.section, self.module, self.limit, self.metric_name)
        first = None
        for batch, fp32, target in batches:
            first = first if first is not None else batch
            scores.reference(fp32, target)
            scores.add("int8_onnx", runtime.run(scored, batch), fp32, target)
        if first is None:
            raise InputError(f"{self.section}: the data yielded no batches")
        figures = scores.result()
        self.batches = figures["batches"]
        result: dict[str, Any] = {"sqnr_db": figures["sqnr_db"]["int8_onnx"]}
        if self.metric_name:
            self.fp32_torch = figures["fp32_torch"]
            result.update({"int8_onnx": figures["int8_onnx"], "drop": figures["drop"]})
        result["latency_ms"] = runtime.latency_ms(sess, first, runs=10, warmup=2)
        return result
