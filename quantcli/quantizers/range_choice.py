"""`observer: auto`: one activation range rule for the whole model, chosen on held-out calibration batches.

Neither the histogram search (which clips rare values for resolution) nor min to max (which keeps them) is ahead
across models, and which one a model prefers can flip with the target's weights (docs/accuracy.md, Activation
ranges). So calibrate measures both: after the last batch, for each rule in turn, the biases are corrected as that
rule's convert will quantize (quantizers.bias_correction, on the first batch), the batches after the first (up to
HELD_OUT_SAMPLES samples; the correction never saw them) run fake-quantized with the convert's arithmetic, and the
rule whose outputs are nearer the float ones is kept, in every `auto` observer's `searched` buffer, so convert
quantizes with it. The float outputs are those the calibration forwards returned (observers pass their input
through, and the biases are corrected only after the last batch). With one calibration batch nothing is held out,
and the search stays: judged on the batch the biases were corrected on, the choice leans to min to max.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from quantcli.loading.data import samples_in
from quantcli.quantizers import bias_correction
from quantcli.quantizers.observers import ChosenRangeObserver

HELD_OUT_SAMPLES = 64  # the batches after the first are kept for the choice until they hold this many samples
HELD_OUT_BYTES = 2**28  # or their inputs and float outputs this many bytes (a second batch is always kept)
RULES = {True: "histogram", False: "minmax"}  # `searched` -> the observer the choice behaves as


def chosen_range_observers(module: Any) -> list[ChosenRangeObserver]:
    """The `auto` observers the module's graph calls (each once)."""
    seen: dict[int, ChosenRangeObserver] = {}
    for node in module.graph.nodes:
        if node.op == "call_module":
            obs = module.get_submodule(node.target)
            if isinstance(obs, ChosenRangeObserver):
                seen.setdefault(id(obs), obs)
    return list(seen.values())


class Session:
    """One calibration's forwards: the first through the bias correction's float pass (where biases are
    corrected), the batches after it kept with their float outputs for the choice; `finish` after the last
    batch chooses the ranges and corrects the biases."""

    def __init__(self, module: Any, correct: bool) -> None:
        self.module = module
        self.correction = bias_correction.Correction(module) if correct else None
        self.observers = chosen_range_observers(module)
        self.held: list[tuple[tuple, list[torch.Tensor]]] = []

    def forward(self, index: int, args: tuple) -> Any:
        if index == 0 and self.correction is not None:
            out = self.correction.observe(*args)
        else:
            out = self.module(*args)
        if index > 0 and self.observers and self._room():  # a copy: a data source may reuse its buffers
            self.held.append((tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), float_outputs(out)))
        return out

    def _room(self) -> bool:
        samples = sum(samples_in(args) for args, _ in self.held)
        tensors = [t for args, outs in self.held for t in (*args, *outs) if isinstance(t, torch.Tensor)]
        size = sum(t.element_size() * t.numel() for t in tensors)
        return not self.held or (samples < HELD_OUT_SAMPLES and size < HELD_OUT_BYTES)

    def finish(self) -> tuple[list[str], dict[str, Any] | None]:
        """(the biases corrected, the choice made: None where the model has no `auto` observer)."""
        if not self.observers:
            return self._correct(), None
        if not self.held:
            for obs in self.observers:
                obs.searched.fill_(True)
            return self._correct(), {"rule": RULES[True], "why": "one calibration batch: none held out to choose on"}
        biases = sorted(set(self.correction.layers.values())) if self.correction is not None else []
        choice = choose(self.module, self.observers, self.held, self._correct, biases)
        return choice.pop("biases"), choice

    def _correct(self, make: Callable[[Any], torch.nn.Module] = bias_correction.fake_quant) -> list[str]:
        return self.correction.apply(make) if self.correction is not None else []


def choose(
    module: Any,
    observers: list[ChosenRangeObserver],
    held: list[tuple[tuple, list[torch.Tensor]]],
    correct: Callable[..., list[str]],
    bias_names: list[str],
) -> dict[str, Any]:
    """Try each rule on every observer in `observers`, the parameters `bias_names` corrected by `correct(make)`
    first; keep the rule of the least output error on `held` ((args, float outputs) pairs), a tie the search.
    The biases end as the kept rule's correction made them. {"rule", "sqnr_db" per rule, "held_out_samples",
    "biases": those corrected}."""
    params = {name: module.get_parameter(name) for name in bias_names}
    start = {name: p.detach().clone() for name, p in params.items()}
    trials: dict[bool, tuple[float, dict[str, torch.Tensor], list[str]]] = {}
    for searched in RULES:
        for obs in observers:
            obs.searched.fill_(searched)
        _restore(params, start)
        make = _quantizers()
        corrected = correct(make)
        with torch.no_grad(), bias_correction.observers_replaced(module, make):
            error = output_error([(floats, float_outputs(module(*args))) for args, floats in held])
        trials[searched] = (error, {n: p.detach().clone() for n, p in params.items()}, corrected)
    kept = min(RULES, key=lambda s: (trials[s][0], not s))
    for obs in observers:
        obs.searched.fill_(kept)
    _restore(params, trials[kept][1])
    return {
        "rule": RULES[kept],
        "sqnr_db": {RULES[s]: _db(trials[s][0]) for s in RULES},
        "held_out_samples": sum(samples_in(args) for args, _ in held),
        "biases": trials[kept][2],
    }


def _quantizers() -> Callable[[Any], torch.nn.Module]:
    """bias_correction.fake_quant made once per observer: the correction and the outputs quantize alike, and the
    range search runs once per rule."""
    made: dict[int, torch.nn.Module] = {}

    def make(obs: Any) -> torch.nn.Module:
        if id(obs) not in made:
            made[id(obs)] = bias_correction.fake_quant(obs)
        return made[id(obs)]

    return make


def float_outputs(out: Any) -> list[torch.Tensor]:
    """A forward's floating-point output tensors (of whatever structure), detached."""
    from quantcli import _torch

    leaves = (t for _, t in _torch.output_leaves(out))
    return [t.detach() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def output_error(pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> float:
    """Over (float outputs, quantized outputs) pairs of batches: each output's squared error over its float
    energy, both summed over the batches, then summed over the outputs (one output: 1 / its SQNR)."""
    errors: list[float] = []
    energies: list[float] = []
    for floats, quantized in pairs:
        for i, (f, q) in enumerate(zip(floats, quantized)):
            if i == len(errors):
                errors.append(0.0)
                energies.append(0.0)
            f, q = f.double(), q.double()
            errors[i] += float(((f - q) ** 2).sum())
            energies[i] += float((f**2).sum())
    return sum(e / s if s > 0 else e for e, s in zip(errors, energies))


def _restore(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


def _db(error: float) -> float | None:
    return round(-10 * math.log10(error), 2) if error > 0 else None
