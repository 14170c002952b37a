"""The export parity check: does the ONNX model misbehave in ONNX Runtime?

Comparing ORT with the PyTorch int8 model alone (a fixed SQNR floor) fails good deep models: two
correct int8 implementations round a few values differently, and a deep network spreads those
differences (28-30 dB between ORT and PyTorch on a real 6-layer BERT, EfficientNet-Lite and
Swin-T, while ORT was as close to fp32 as PyTorch was). What a user ships is ORT's output, so the
check asks what ORT *adds* to the error that quantization itself costs:

    excess_db = 10 log10( |ORT - fp32|^2 / |int8 - fp32|^2 )
              = SQNR(int8 vs fp32) - SQNR(ORT vs fp32)

measured per output on the same sample. An ORT model that rounds like PyTorch has an excess
near 0 dB (its rounding spread is a second realization of the same quantization noise: at most
+3 dB, where it is as large as the noise itself); a saturating kernel, a corrupted scale or a
mis-exported op makes ORT's error many times quantization's. The check passes when the worst
excess is at most `max_excess_db` (and, if the recipe sets `parity_min_sqnr_db`, ORT vs the
PyTorch int8 model is at least that floor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# Noise below 1e-10 of the signal power (100 dB) counts as none: float kernels alone differ by more.
_NOISE_FLOOR = 1e-10


def _powers(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    ref = np.asarray(reference, dtype=np.float64)
    return float(np.sum(ref**2)), float(np.sum((ref - np.asarray(other, dtype=np.float64)) ** 2))


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (capped at 200 for identical outputs)."""
    return db_of(*_powers(reference, other))


class Powers:
    """Signal and noise power summed over batches, for an SQNR over data that never sits in memory at once."""

    def __init__(self) -> None:
        self.signal, self.noise = 0.0, 0.0

    def add(self, reference: np.ndarray, other: np.ndarray) -> None:
        signal, noise = _powers(reference, other)
        self.signal += signal
        self.noise += noise

    def db(self) -> float:
        return db_of(self.signal, self.noise)


def db_of(signal: float, noise: float) -> float:
    """SQNR in dB of summed signal and noise powers (capped at 200; -200 where there is no signal)."""
    if not math.isfinite(noise):
        return -200.0
    if noise == 0.0:
        return 200.0
    if signal == 0.0:
        return -200.0
    return round(float(min(200.0, 10.0 * np.log10(signal / noise))), 3)


def excess_db(fp32: np.ndarray, int8: np.ndarray, ort: np.ndarray) -> float:
    """How much more error (dB of noise power) ORT has against fp32 than the PyTorch int8 model has."""
    signal, quantization = _powers(fp32, int8)
    _, deployed = _powers(fp32, ort)
    if not math.isfinite(deployed):
        return 200.0
    floor = max(signal, 1e-30) * _NOISE_FLOOR
    return round(10.0 * math.log10(max(deployed, floor) / max(quantization, floor)), 3) + 0.0  # no -0.0


def output_figures(fp32: np.ndarray, int8: np.ndarray, ort: np.ndarray) -> dict[str, float]:
    return {
        "ort_vs_int8_db": sqnr_db(int8, ort),
        "int8_vs_fp32_db": sqnr_db(fp32, int8),
        "ort_vs_fp32_db": sqnr_db(fp32, ort),
        "excess_db": excess_db(fp32, int8, ort),
    }


def verdict(
    names: Sequence[str],
    fp32: Sequence[np.ndarray],
    int8: Sequence[np.ndarray],
    ort: Sequence[np.ndarray],
    *,
    max_excess_db: float,
    min_sqnr_db: float | None = None,
) -> dict[str, Any]:
    """The parity section of the export report: per-output figures, the worst ones, pass or fail."""
    per_output = {name: output_figures(f, q, o) for name, f, q, o in zip(names, fp32, int8, ort)}
    worst_sqnr = min(v["ort_vs_int8_db"] for v in per_output.values())
    worst_excess = max(v["excess_db"] for v in per_output.values())
    passed = worst_excess <= max_excess_db and (min_sqnr_db is None or worst_sqnr >= min_sqnr_db)
    return {
        "passed": bool(passed),
        "excess_db": worst_excess,
        "max_excess_db": max_excess_db,
        "min_sqnr_db": worst_sqnr,
        "threshold_db": min_sqnr_db,
        "per_output": per_output,
        "samples": int(np.asarray(fp32[0]).shape[0]) if len(fp32) and np.asarray(fp32[0]).ndim else 1,
    }


def with_local(target: dict[str, Any], local: dict[str, Any], target_cpu: str) -> dict[str, Any]:
    """The verdict on the target's emulated arithmetic, which this CPU's ONNX Runtime must pass too."""
    summary = {k: local[k] for k in ("passed", "excess_db", "min_sqnr_db")}
    return {**target, "passed": bool(target["passed"] and local["passed"]), "emulated": target_cpu, "local": summary}


def on_target(target: dict[str, Any], local: dict[str, Any], target_cpu: str) -> dict[str, Any]:
    """The verdict on the target's arithmetic (the model run unfused), with this CPU's ONNX Runtime's, which
    saturates where the target does not, recorded beside it: not the target's outputs, so not judged."""
    return {**target, "unfused": target_cpu, "local": {k: local[k] for k in ("passed", "excess_db", "min_sqnr_db")}}


def failure(check: dict[str, Any]) -> str:
    """The one-line reason a failed check gives."""
    if "unfused" in check:
        plain = {k: v for k, v in check.items() if k not in ("unfused", "local")}
        return f"on {check['unfused']}'s arithmetic (unfused): " + failure(plain)
    if "emulated" in check:
        plain = {k: v for k, v in check.items() if k not in ("emulated", "local")}
        if _within(plain):
            return "on this CPU: " + failure({**plain, **check["local"]})
        return f"with {check['emulated']}'s int16 pair saturation emulated: " + failure(plain)
    if check["excess_db"] > check["max_excess_db"]:
        return (
            f"ONNX Runtime's error against fp32 is {check['excess_db']:.1f} dB above the PyTorch int8 model's "
            f"(export.parity_max_excess_db {check['max_excess_db']})"
        )
    return (
        f"ONNX Runtime vs the converted model {check['min_sqnr_db']:.1f} dB < export.parity_min_sqnr_db "
        f"{check['threshold_db']}"
    )


def _within(check: dict[str, Any]) -> bool:
    floor = check["threshold_db"]
    return check["excess_db"] <= check["max_excess_db"] and (floor is None or check["min_sqnr_db"] >= floor)
