"""What quantizing one linear's weight gives: codes on a grid, their scales and zero points, an input scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantcli.weightonly.grid import Grid, dequantize


@dataclass
class Quantized:
    """One linear's quantized weight: y = (x / input_scale) @ weight().T, input_scale None meaning 1."""

    grid: Grid
    codes: torch.Tensor  # [N, K], int8 (signed grids) or uint8
    scale: torch.Tensor  # [N, blocks] float32
    zero: torch.Tensor | None  # [N, blocks] as codes, asymmetric grids only
    input_scale: torch.Tensor | None = None  # [K] float32 (AWQ), the input is divided by it

    def weight(self) -> torch.Tensor:
        """The dequantized weight [N, K] float32, exactly as DequantizeLinear computes it."""
        return dequantize(self.codes, self.scale, self.zero, self.grid)

    def error(self, w: torch.Tensor, hessian: torch.Tensor) -> float:
        """The layer's output error summed over the rows behind `hessian` (sum of x x^T):
        ||X W^T - (X / input_scale) Wq^T||^2 = tr(E H E^T) with E = W - Wq / input_scale."""
        effective = self.weight().double()
        if self.input_scale is not None:
            effective = effective / self.input_scale.double()
        e = w.double() - effective
        return float(((e @ hessian.double()) * e).sum())
