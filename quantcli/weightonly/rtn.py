"""Round to nearest: each block's min/max grid, every weight rounded on it. Needs no data."""

from __future__ import annotations

import torch

from quantcli.weightonly.grid import Grid, fit, quantize
from quantcli.weightonly.result import Quantized


def rtn(w: torch.Tensor, grid: Grid) -> Quantized:
    scale, zero = fit(w, grid)
    return Quantized(grid, quantize(w.float(), scale, zero, grid), scale, zero)
