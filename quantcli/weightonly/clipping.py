"""Each block's grid fitted to its share of a linear's output error: the clip search of AWQ's reference code
(llm-awq's auto_clip), which GPTQ's static groups use too.

For every block of a weight W [N, K], the grid of least error on the block's own output contribution
e_b H_bb e_b^T (H the input's Hessian, the sum of x x^T; cross-block terms are not counted) among the
block's range times 1, 0.95, ..., 0.55 (the weights beyond it clipped) and, on a symmetric grid, both ways
of spanning that range (quantcli.weightonly.grid.fit): its largest magnitude over half the span (7.5), and
its value of largest magnitude exactly on the grid's end (-8). On a real 135M decoder the second took GPTQ's
perplexity from 38.0 to 31.2 and the search over both to 30.4 (round to nearest: 39.1; docs/weight-only.md).
"""

from __future__ import annotations

import torch

from quantcli.weightonly.grid import Grid, blocked, dequantize, fit, quantize

POINTS = 10  # range factors 1, 0.95, ..., 0.55, as the reference code's


def candidates(grid: Grid) -> list[tuple[float, bool]]:
    """(range factor, exact extreme) of every grid the search tries, in the order ties are kept."""
    spans = (False, True) if grid.symmetric else (False,)
    return [(1 - point / (2 * POINTS), exact) for exact in spans for point in range(POINTS)]


def clipped_fit(w: torch.Tensor, hessian: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale [N, blocks], zero point or None) of least error for each block of w [N, K] (module docstring)."""
    n, k = w.shape
    size, count = grid.block(k), grid.blocks(k)
    padded = torch.nn.functional.pad(hessian.double(), (0, count * size - k, 0, count * size - k))
    diagonal = padded.reshape(count, size, count, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [blocks, b, b]
    best_error = torch.full((n, count), float("inf"), dtype=torch.float64)
    best_scale, best_zero = None, None
    for factor, exact in candidates(grid):
        scale, zero = fit(w, grid, torch.full((n, count), factor), exact_extreme=exact)
        e = blocked(w.double() - dequantize(quantize(w.float(), scale, zero, grid), scale, zero, grid).double(), grid)
        error = torch.einsum("nkb,kbc,nkc->nk", e, diagonal, e)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = zero if best_zero is None else torch.where(better, zero, best_zero)
    return best_scale, best_zero
