"""The one evaluator: data streamed batch by batch, each model scored against the fp32 PyTorch program.

`stream` reads a recipe section's data (an .npz, .npy folder, callable, text or image files) and
yields each batch with the fp32 program's outputs on it and its targets; nothing outlives a batch.
`Scores` sums, per model, the evaluation metric (quantcli.numerics.metrics) and the output SQNR
against fp32. export, `report` and `tune` read their figures from it, under one vocabulary
(docs/keys.md):

- `metric`: the metric's name ("callable" for tune's --metric); `samples`, `batches`;
- `fp32_torch`, `fp32_onnx`, `int8_torch`, `int8_onnx`: each model's metric value;
- the metric's extra figures grouped by figure, per model (`top5`, `tokens`, `worst`);
- `drop`: fp32_torch minus the int8 model shipped (int8_onnx, else int8_torch), in the metric's units
  (0.01 is one accuracy point); for a metric where lower is better (perplexity), the shipped model's
  rise over fp32;
- `sqnr_db`: per model, its worst output's SQNR against fp32 PyTorch, over all batches;
- `top1_agreement`: per int8 model, its top-1 predictions equal to fp32's (accuracy metrics).

A --metric callable `(outputs, targets) -> score` is called once on all outputs: it alone keeps
the first output and the targets of every batch (never the inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from quantcli.errors import RecipeError
from quantcli.loading.data import TARGET_COLUMN, iter_batches, to_tensors
from quantcli.numerics.metrics import METRICS, Accumulator, next_tokens
from quantcli.numerics.parity import Powers
from quantcli.recipe import Recipe

SHIPPED = ("int8_onnx", "int8_torch")  # the int8 model `drop` is measured on, the first one scored
AGREEMENT_METRICS = ("accuracy", "token_accuracy")


class _Concatenated(Accumulator):
    """A user's `(outputs, targets) -> score`, called once on every batch's first output and targets."""

    def __init__(self, score: Callable[[np.ndarray, Any], float]):
        self.score, self.outputs, self.targets = score, [], []

    def update(self, output: np.ndarray, reference: np.ndarray, targets: np.ndarray | None) -> None:
        self.outputs.append(output)
        self.targets.append(targets)

    def result(self) -> dict[str, float]:
        targets = np.concatenate(self.targets) if self.targets and self.targets[0] is not None else None
        try:
            return {"value": round(float(self.score(np.concatenate(self.outputs), targets)), 6)}
        except Exception as exc:
            raise RecipeError(f"--metric failed: {type(exc).__name__}: {exc}") from exc


def needs_targets(metric: str | None) -> bool:
    return metric == "callable" or (metric is not None and METRICS[metric].needs_targets)


def stream(
    recipe: Recipe, what: str, float_module: Any, batches: int | None = None, metric: str | None = None
) -> tuple[int | None, Iterator[tuple[dict[str, np.ndarray], list, Any]]]:
    """(batch count if known, iterator of (inputs, the fp32 program's outputs, targets)) over section `what`."""
    from quantcli.loading.files import reader

    section = getattr(recipe, what)
    targets = needs_targets(metric)
    total, raw = iter_batches(
        section.data,
        section.keys,
        recipe.inputs,
        section.batch_size,
        batches,
        what,
        targets=section.targets if targets else None,
        files=reader(recipe, what, targets=targets),
    )

    from_inputs = metric in METRICS and METRICS[metric].next_token

    def run() -> Iterator[tuple[dict[str, np.ndarray], list, Any]]:
        from quantcli import _torch

        for batch in raw:
            target = next_tokens(batch) if from_inputs else batch.pop(TARGET_COLUMN, None)
            with _torch.torch.no_grad():
                out = float_module(*to_tensors(batch, recipe.inputs))
            yield batch, [t.numpy() for _, t in _torch.output_leaves(out)], target

    return total, run()


class Scores:
    """Per model: the metric and the output SQNR against fp32 PyTorch, summed batch by batch."""

    def __init__(self, metric: str | None, models: Sequence[str], score: Callable | None = None):
        self.metric = metric
        make = (
            (lambda: _Concatenated(score))
            if metric == "callable"
            else (METRICS[metric].accumulator if metric else None)
        )
        self.accumulators = {m: make() for m in models} if make else {}
        self.powers: dict[str, list[Powers]] = {m: [] for m in models}
        self.agreement: dict[str, list[int]] = {}
        self.batches = self.samples = 0

    def reference(self, fp32: Sequence[np.ndarray], target: Any) -> None:
        """A batch's fp32 PyTorch outputs: the fp32_torch model's figures and the sample count."""
        self.batches += 1
        self.samples += int(np.shape(fp32[0])[0]) if np.ndim(fp32[0]) else 1
        if "fp32_torch" in self.powers:
            self.add("fp32_torch", fp32, fp32, target)

    def add(self, model: str, outputs: Sequence[np.ndarray], fp32: Sequence[np.ndarray], target: Any) -> None:
        """`model`'s outputs on the batch whose fp32 outputs are `fp32`."""
        if self.accumulators:
            self.accumulators[model].update(outputs[0], fp32[0], target)
        powers = self.powers[model]
        powers.extend(Powers() for _ in range(len(outputs) - len(powers)))
        for p, ref, out in zip(powers, fp32, outputs):
            p.add(ref, out)
        if self.metric in AGREEMENT_METRICS and model in SHIPPED:
            same, count = self.agreement.setdefault(model, [0, 0]), fp32[0][..., 0].size
            same[0] += int((fp32[0].argmax(-1) == outputs[0].argmax(-1)).sum())
            same[1] += count

    def sqnr_db(self, model: str) -> float:
        return min(p.db() for p in self.powers[model])

    def result(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "batches": self.batches,
            "samples": self.samples,
            "sqnr_db": {m: self.sqnr_db(m) for m, p in self.powers.items() if p and m != "fp32_torch"},
        }
        if not self.accumulators:
            return doc
        results = {m: acc.result() for m, acc in self.accumulators.items() if self.powers[m]}
        doc.update({"metric": self.metric, **{m: r["value"] for m, r in results.items()}})
        for figure in sorted({k for r in results.values() for k in r} - {"value"}):
            doc[figure] = {m: r[figure] for m, r in results.items() if figure in r}
        shipped = next((m for m in SHIPPED if m in results), None)
        if shipped is not None and "fp32_torch" in results:
            drop = results["fp32_torch"]["value"] - results[shipped]["value"]
            higher_is_better = self.metric not in METRICS or METRICS[self.metric].higher_is_better
            doc["drop"] = round(drop if higher_is_better else -drop, 6)  # a perplexity's drop is its rise
        if self.agreement:
            doc["top1_agreement"] = {m: round(same / count, 6) for m, (same, count) in self.agreement.items()}
        return doc
