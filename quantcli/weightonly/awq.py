"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"):
scale up the weight's input channels that see large activations before rounding, and divide the input by
the same scales, so the salient weights lose less to rounding.

The paper's scale search: s = s_X ** alpha, s_X the mean |x| of each input channel over the calibration
tokens, alpha on a grid of 20 points in [0, 1), s normalized by sqrt(max(s) * min(s)); the alpha kept is
the one of least output error ||X W^T - (X / s) Q(W s)^T||^2. The error is computed exactly from the
layer's input Hessian (sum of x x^T over the same tokens) rather than on a sample of them. alpha 0 is
round to nearest, so the result is never worse than RTN on the calibration data. Where the paper folds
1/s into the op before the linear, the exported model divides the linear's input (one Mul).
"""

from __future__ import annotations

import torch

from quantcli.weightonly.grid import Grid
from quantcli.weightonly.result import Quantized
from quantcli.weightonly.rtn import rtn

GRID_POINTS = 20


def candidate(w: torch.Tensor, magnitude: torch.Tensor, alpha: float, grid: Grid) -> Quantized:
    """The weight quantized with input scales magnitude ** alpha (the paper's normalization)."""
    s = magnitude.double().pow(alpha).clamp(min=1e-4)
    s = (s / (s.max() * s.min()).sqrt()).float()
    scaled = rtn(w.float() * s[None, :], grid)
    scaled.input_scale = s
    return scaled


def awq(w: torch.Tensor, hessian: torch.Tensor, magnitude: torch.Tensor, grid: Grid) -> tuple[Quantized, float]:
    """(the quantized weight of least output error over the alpha grid, its alpha); alpha 0: no input scale."""
    best, best_alpha, best_error = None, 0.0, float("inf")
    for point in range(GRID_POINTS):
        alpha = point / GRID_POINTS
        result = rtn(w, grid) if point == 0 else candidate(w, magnitude, alpha, grid)
        error = result.error(w, hessian)
        if error < best_error:
            best, best_alpha, best_error = result, alpha, error
    return best, best_alpha
