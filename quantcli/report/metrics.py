"""Evaluation metrics' accumulators (numpy only, no torch), by the names of quantcli.report.names.

The recipe schema reads the names registry to reject a metric the task cannot have (`validate` stays
instant, without numpy); the export report's evaluation streams batches through `Accumulator.update` so memory stays
bounded by a batch. Every accumulator sees the fp32 PyTorch output of the same batch as `reference`:
a metric against the targets ignores it, a metric against the fp32 model (cosine) needs no targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from quantcli.report import names
from quantcli.report.names import MetricName, fits, fitting  # noqa: F401  (re-exported)

IGNORE = -100  # a target no metric or loss counts: sub-tokens after a word's first, special tokens, padding


class Accumulator:
    """Sums one model's metric over batches."""

    def update(self, output: np.ndarray, reference: np.ndarray, targets: np.ndarray | None) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        """{"value": the metric, ...extra figures}."""
        raise NotImplementedError


class Accuracy(Accumulator):
    """Top-1 accuracy of class scores [batch, classes] against class indices, and top-5 over 5+ classes."""

    def __init__(self) -> None:
        self.correct, self.top5, self.count, self.classes = 0, 0, 0, 0

    def update(self, output: np.ndarray, reference: np.ndarray, targets: np.ndarray | None) -> None:
        scores = output.reshape(len(output), -1)
        self.classes = scores.shape[1]
        self.correct += int((scores.argmax(-1) == targets).sum())
        if self.classes > 5:
            best = np.argpartition(-scores, 5, axis=1)[:, :5]
            self.top5 += int((best == targets[:, None]).any(axis=1).sum())
        self.count += len(targets)

    def result(self) -> dict[str, float]:
        extra = {"top5": round(self.top5 / self.count, 5)} if self.classes > 5 else {}
        return {"value": round(self.correct / self.count, 5), **extra}


class TokenAccuracy(Accumulator):
    """Accuracy over labelled tokens: scores [batch, seq, classes], targets [batch, seq], IGNORE skipped."""

    def __init__(self) -> None:
        self.correct, self.count = 0, 0

    def update(self, output: np.ndarray, reference: np.ndarray, targets: np.ndarray | None) -> None:
        labelled = targets != IGNORE
        self.correct += int(((output.argmax(-1) == targets) & labelled).sum())
        self.count += int(labelled.sum())

    def result(self) -> dict[str, float]:
        return {"value": round(self.correct / max(self.count, 1), 5), "tokens": self.count}


class Cosine(Accumulator):
    """Cosine similarity of each sample's output (flattened) to the fp32 PyTorch model's: mean and worst."""

    def __init__(self) -> None:
        self.total, self.count, self.worst = 0.0, 0, 1.0

    def update(self, output: np.ndarray, reference: np.ndarray, targets: np.ndarray | None) -> None:
        a = output.reshape(len(output), -1).astype(np.float64)
        b = reference.reshape(len(reference), -1).astype(np.float64)
        denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        cos = np.clip((a * b).sum(axis=1) / denom, -1.0, 1.0)
        self.total += float(cos.sum())
        self.count += len(cos)
        self.worst = min(self.worst, float(cos.min()))

    def result(self) -> dict[str, float]:
        return {"value": round(self.total / self.count, 6), "worst": round(self.worst, 6)}


@dataclass(frozen=True)
class Metric(MetricName):
    """A metric of the registry (quantcli.report.names) with its accumulator."""

    accumulator: Callable[[], Accumulator]


_ACCUMULATORS: dict[str, Callable[[], Accumulator]] = {
    "accuracy": Accuracy, "token_accuracy": TokenAccuracy, "cosine": Cosine}
METRICS: dict[str, Metric] = {name: Metric(**vars(info), accumulator=_ACCUMULATORS[name])
                              for name, info in names.METRICS.items()}


def summarize(metric: str, results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Report fields: each model's value under its name, the extra figures grouped by figure."""
    doc: dict[str, Any] = {name: r["value"] for name, r in results.items()}
    extras = sorted({k for r in results.values() for k in r} - {"value"})
    for key in extras:
        doc[key] = {name: r[key] for name, r in results.items() if key in r}
    if METRICS[metric].percent:
        doc["accuracy_drop_points"] = round(100 * (doc["fp32_torch"] - doc["int8_onnx"]), 3)
    return doc
