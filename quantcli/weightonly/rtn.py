"""Round to nearest: each block's grid from its extremes (the value of largest magnitude exactly on the grid
where symmetric, quantcli.weightonly.grid), every weight rounded on it. Needs no data."""

from __future__ import annotations

import torch

from quantcli.weightonly.grid import Grid, fit, quantize
from quantcli.weightonly.result import Quantized


def rtn(w: torch.Tensor, grid: Grid, *, exact_extreme: bool = True) -> Quantized:
    """w rounded on its blocks' grids; `exact_extreme=False` gives the half-span grid AWQ searches on."""
    scale, zero = fit(w, grid, exact_extreme=exact_extreme)
    return Quantized(grid, quantize(w.float(), scale, zero, grid), scale, zero)
