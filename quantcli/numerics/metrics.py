"""Evaluation metrics' accumulators (numpy only, no torch), by the names of quantcli.numerics.names.

The recipe schema reads the names registry to reject a metric the task cannot have (`validate` stays
instant, without numpy); the export report's evaluation streams batches through `Accumulator.update` so memory stays
bounded by a batch. Every accumulator sees the fp32 PyTorch output of the same batch as `reference`:
a metric against the targets ignores it, a metric against the fp32 model (cosine) needs no targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from quantcli.errors import QuantCliError
from quantcli.loading.targets import class_indices
from quantcli.numerics import names
from quantcli.numerics.names import MetricName, fits, fitting  # noqa: F401  (re-exported)

IGNORE = -100  # a target no metric or loss counts: sub-tokens after a word's first, special tokens, padding


class Accumulator:
    """Sums one model's metric over batches."""

    name = ""
    bounds = (0.0, 1.0)  # where the value must lie: one outside is a defect, never a result

    def update(self, output: np.ndarray, reference: np.ndarray, targets: np.ndarray | None) -> None:
        raise NotImplementedError

    def figures(self) -> dict[str, float]:
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        """{"value": the metric, ...extra figures}; an internal error when the value is outside its bounds."""
        figures = self.figures()
        low, high = self.bounds
        if not low <= figures["value"] <= high:
            raise QuantCliError(f"internal error: {self.name} came out as {figures['value']}, outside [{low}, {high}]")
        return figures


class Accuracy(Accumulator):
    """Top-1 accuracy of class scores [batch, classes] against class indices, and top-5 over 5+ classes."""

    name = "accuracy"

    def __init__(self) -> None:
        self.correct, self.top5, self.count, self.classes = 0, 0, 0, 0

    def update(self, output: np.ndarray, reference: np.ndarray, targets: np.ndarray | None) -> None:
        scores = output.reshape(len(output), -1)
        self.classes = scores.shape[1]
        targets = class_indices(targets, 0, self.classes, self.name)
        self.correct += int((scores.argmax(-1) == targets).sum())
        if self.classes > 5:
            best = np.argpartition(-scores, 5, axis=1)[:, :5]
            self.top5 += int((best == targets[:, None]).any(axis=1).sum())
        self.count += len(targets)

    def figures(self) -> dict[str, float]:
        extra = {"top5": round(self.top5 / self.count, 5)} if self.classes > 5 else {}
        return {"value": round(self.correct / self.count, 5), **extra}


class TokenAccuracy(Accumulator):
    """Accuracy over labelled tokens: scores [batch, seq, classes], targets [batch, seq], IGNORE skipped."""

    name = "token_accuracy"

    def __init__(self) -> None:
        self.correct, self.count = 0, 0

    def update(self, output: np.ndarray, reference: np.ndarray, targets: np.ndarray | None) -> None:
        targets = class_indices(targets, 1, output.shape[-1], self.name, ignore=IGNORE)
        labelled = targets != IGNORE
        self.correct += int(((output.argmax(-1) == targets) & labelled).sum())
        self.count += int(labelled.sum())

    def figures(self) -> dict[str, float]:
        return {"value": round(self.correct / max(self.count, 1), 5), "tokens": self.count}


class Cosine(Accumulator):
    """Cosine similarity of each sample's output (flattened) to the fp32 PyTorch model's: mean and worst."""

    name = "cosine"
    bounds = (-1.0, 1.0)

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

    def figures(self) -> dict[str, float]:
        return {"value": round(self.total / self.count, 6), "worst": round(self.worst, 6)}


class Perplexity(Accumulator):
    """exp(mean -log p(next token)) of a decoder's logits [batch, seq, vocab] over the targets (IGNORE skipped)."""

    name = "perplexity"
    bounds = (1.0, float("inf"))

    def __init__(self) -> None:
        self.nll, self.count = 0.0, 0

    def update(self, output: np.ndarray, reference: np.ndarray, targets: np.ndarray | None) -> None:
        labelled = targets != IGNORE
        logits = output[labelled].astype(np.float64)  # [tokens, vocab]
        top = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        self.nll += float((log_z - logits[np.arange(len(logits)), targets[labelled]]).sum())
        self.count += len(logits)

    def figures(self) -> dict[str, float]:
        return {"value": round(float(np.exp(self.nll / max(self.count, 1))), 4), "tokens": self.count}


def next_tokens(batch: dict[str, np.ndarray]) -> np.ndarray:
    """A decoder's targets: each position's next input id, IGNORE where it or the next position is padding
    and at the last position."""
    if "input_ids" not in batch:
        raise QuantCliError("perplexity: the model has no input_ids input to take the next tokens from")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", np.ones_like(ids)) > 0
    targets = np.full(ids.shape, IGNORE, dtype=np.int64)
    targets[:, :-1] = np.where(mask[:, :-1] & mask[:, 1:], ids[:, 1:], IGNORE)
    return targets


@dataclass(frozen=True)
class Metric(MetricName):
    """A metric of the registry (quantcli.numerics.names) with its accumulator."""

    accumulator: Callable[[], Accumulator] = field(kw_only=True)


_ACCUMULATORS: dict[str, Callable[[], Accumulator]] = {
    "accuracy": Accuracy,
    "token_accuracy": TokenAccuracy,
    "cosine": Cosine,
    "perplexity": Perplexity,
}
METRICS: dict[str, Metric] = {
    name: Metric(**vars(info), accumulator=_ACCUMULATORS[name]) for name, info in names.METRICS.items()
}
