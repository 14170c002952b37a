"""Evaluation metrics by name: the tasks each fits and whether it needs targets, without numpy or torch.

The recipe schema validates `evaluation.metric` against METRICS (so `quantcli validate` stays instant);
`quantcli.numerics.metrics` gives each name its accumulator, and checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricName:
    """A metric: the tasks it fits (None: any, a factory model's too), whether it needs targets."""

    tasks: tuple[str, ...] | None
    needs_targets: bool
    percent: bool  # reported and rendered as a share (accuracy) rather than a similarity
    target_axes: int | None = None  # class-index targets' axes beyond the sample axis (loading.targets)
    next_token: bool = False  # its targets are the inputs' next tokens (input_ids shifted), not data given
    higher_is_better: bool = True  # `drop` is fp32 minus the quantized model's value, else the other way round


METRICS: dict[str, MetricName] = {
    "accuracy": MetricName(("text-classification", "image-classification"), True, True, target_axes=0),
    "token_accuracy": MetricName(("token-classification",), True, True, target_axes=1),
    "cosine": MetricName(None, False, False),  # each sample's output against the fp32 model's: no targets
    # exp of the mean negative log-likelihood of each next token (best measured on evaluation.windows)
    "perplexity": MetricName(("text-generation",), False, False, next_token=True, higher_is_better=False),
}


def fits(metric: str, task: str | None) -> bool:
    """Whether `metric` can be computed for `task` (a factory model has no task: any metric)."""
    tasks = METRICS[metric].tasks
    return task is None or tasks is None or task in tasks


def fitting(task: str | None) -> list[str]:
    return [name for name in METRICS if fits(name, task)]
