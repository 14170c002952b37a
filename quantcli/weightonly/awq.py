"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"):
scale up the weight's input channels that see large activations before rounding, and divide the input by
the same scales, so the salient weights lose less to rounding.

The paper's scale search: s = s_X ** alpha, s_X the mean |x| of each input channel over the calibration
tokens, alpha on a grid of 20 points in [0, 1), s normalized by sqrt(max(s) * min(s)); the alpha kept is
the one of least output error ||X W^T - (X / s) Q(W s)^T||^2. Linears that read one input (q, k and v;
gate and up) share one s, as in the authors' code (llm-awq's auto_scale): the alpha kept is the one of
least error summed over them. The error is computed exactly from the input's Hessian (sum of x x^T over
the same tokens) rather than on a sample of them. alpha 0 is round to nearest, so the search never does
worse than RTN on the calibration data. Then the clip search of the authors' code (llm-awq's auto_clip),
for each linear on its scaled weight: each block's grid the one of least error on the block's own output
contribution (quantcli.weightonly.clipping). Where the input is a norm's output, 1/s is folded into the norm's
weight, and where it is a gated MLP's act(gate(x)) * up(x) or a linear's output read by one linear alone,
into those rows (quantcli.weightonly.apply), as the reference code does; where nothing folds it, no scale
is searched: the clip search alone (`awq(..., scale=False)`).
"""

from __future__ import annotations

import torch

from quantcli.weightonly.clipping import clipped_fit
from quantcli.weightonly.grid import Grid, quantize
from quantcli.weightonly.result import Quantized
from quantcli.weightonly.rtn import rtn

GRID_POINTS = 20


def candidate(w: torch.Tensor, magnitude: torch.Tensor, alpha: float, grid: Grid) -> Quantized:
    """The weight quantized with input scales magnitude ** alpha (the paper's normalization)."""
    s = magnitude.double().pow(alpha).clamp(min=1e-4)
    s = (s / (s.max() * s.min()).sqrt()).float()
    scaled = rtn(w.float() * s[None, :], grid, exact_extreme=False)  # one grid to compare the alphas on
    scaled.input_scale = s
    return scaled


def search(
    ws: list[torch.Tensor], hessian: torch.Tensor, magnitude: torch.Tensor, grids: list[Grid]
) -> tuple[list[Quantized], float]:
    """(the quantized weights of least output error summed over the linears reading one input, over the alpha
    grid; that alpha): one input scale for all of them; alpha 0: none (round to nearest)."""
    best, best_alpha, best_error = None, 0.0, float("inf")
    for point in range(GRID_POINTS):
        alpha = point / GRID_POINTS
        if point == 0:
            results = [rtn(w, grid, exact_extreme=False) for w, grid in zip(ws, grids)]
        else:
            results = [candidate(w, magnitude, alpha, grid) for w, grid in zip(ws, grids)]
        error = sum(result.error(w, hessian) for result, w in zip(results, ws))
        if error < best_error:
            best, best_alpha, best_error = results, alpha, error
    return best, best_alpha


def clip(w: torch.Tensor, hessian: torch.Tensor, grid: Grid) -> Quantized:
    """Round to nearest on each block's grid of least error on its own output contribution (the reference
    code's clip search, quantcli.weightonly.clipping)."""
    scale, zero = clipped_fit(w, hessian, grid)
    return Quantized(grid, quantize(w.float(), scale, zero, grid), scale, zero)


def awq(
    ws: list[torch.Tensor], hessian: torch.Tensor, magnitude: torch.Tensor, grids: list[Grid], scale: bool = True
) -> tuple[list[Quantized], float]:
    """The paper's scale search over the linears reading one input (one shared scale), then each linear's clip
    search on its scaled weight (the input Hessian scaled too); (their results, the alpha). Without `scale` (no op
    before them to fold it into), the clip search alone, alpha 0."""
    found, alpha = search(ws, hessian, magnitude, grids) if scale else (None, 0.0)
    if alpha == 0:
        return [clip(w, hessian, grid) for w, grid in zip(ws, grids)], alpha
    s = found[0].input_scale
    scaled = hessian.double() / (s[:, None].double() * s[None, :].double())
    results = [clip(w.float() * s[None, :], scaled, grid) for w, grid in zip(ws, grids)]
    for result in results:
        result.input_scale = s
    return results, alpha
