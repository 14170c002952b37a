"""The integer grid of a weight-only setting: per-block scales (and zero points), rounding, dequantizing.

A weight W is [N, K] (out, in), as torch's Linear stores it. Blocks run along K: each output row has
ceil(K / block_size) blocks, the last one shorter when the block does not divide K (ONNX's blocked
DequantizeLinear and ORT's MatMulNBits take such a block as it is); no block size is one block of all K,
a scale per output channel. Symmetric grids are signed with no zero point (int4 -8..7, int8 -128..127),
the scale the block's largest magnitude over half the grid's span (as torchao and GPTQ's reference do),
or, for round to nearest, its value of largest magnitude over -8 (-128), as ONNX Runtime's MLAS
quantizer (the onnxruntime-genai builder's default) does: that value then lies exactly on the grid's
longer end, and the scale is negative where it is positive. On a real 135M decoder the second gave
round to nearest 0.8x the perplexity of the first (docs/weight-only.md); GPTQ and AWQ choose between
the two for each block (quantcli.weightonly.clipping). Asymmetric grids are unsigned (0..15, 0..255)
with a zero point, over the block's range widened to hold 0. Dequantizing is (q - zero) * scale in
float32: the arithmetic of DequantizeLinear, so the PyTorch weight-only model and the ONNX file hold
the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = {"int4": 4, "int8": 8}


@dataclass(frozen=True)
class Grid:
    bits: int
    symmetric: bool
    block_size: int | None  # None: one block spanning K (a scale per output channel)

    @classmethod
    def of(cls, weights: object) -> Grid:
        """The grid of a recipe's WeightsConfig (dtype, symmetric, block_size)."""
        return cls(BITS[weights.dtype], weights.symmetric, weights.block_size)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def dtype(self) -> torch.dtype:
        """How codes are held in torch: int8 for signed grids, uint8 for unsigned ones (4-bit codes too)."""
        return torch.int8 if self.symmetric else torch.uint8

    def block(self, k: int) -> int:
        """Columns per block of a weight with `k` input columns."""
        return self.block_size or k

    def blocks(self, k: int) -> int:
        return -(-k // self.block(k))


def blocked(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """w [N, K] as [N, blocks, block], the last block padded with zeros (which move no block's range)."""
    n, k = w.shape
    b, nb = grid.block(k), grid.blocks(k)
    return torch.nn.functional.pad(w, (0, nb * b - k)).reshape(n, nb, b)


def fit(
    w: torch.Tensor, grid: Grid, shrink: torch.Tensor | None = None, *, exact_extreme: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale [N, blocks] float32, zero point [N, blocks] or None) of round-to-nearest on w's blocks, each
    block's range times `shrink` [N, blocks] where given (weights beyond it are clipped).

    Symmetric grids: the block's largest magnitude over half the span (7.5 for int4), or with
    `exact_extreme` its value of largest magnitude over qmin (-8), a negative scale where it is positive,
    as ONNX Runtime's MLAS block quantizer does: that value then lies exactly on the grid.
    """
    blocks = blocked(w.float(), grid)
    factor = 1.0 if shrink is None else shrink.float()
    if grid.symmetric and exact_extreme:
        extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1) * factor
        scale = extreme / grid.qmin
        return torch.where(scale != 0, scale, torch.ones_like(scale)), None
    if grid.symmetric:
        scale = blocks.abs().amax(-1) * factor / ((grid.qmax - grid.qmin) / 2)
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    lo, hi = blocks.amin(-1).clamp(max=0) * factor, blocks.amax(-1).clamp(min=0) * factor
    scale = (hi - lo) / (grid.qmax - grid.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = (grid.qmin - torch.round(lo / scale)).clamp(grid.qmin, grid.qmax)
    return scale, zero.to(grid.dtype)


def per_column(t: torch.Tensor, k: int, grid: Grid) -> torch.Tensor:
    """A per-block tensor [N, blocks] repeated to one value per column [N, K]."""
    return t.repeat_interleave(grid.block(k), dim=1)[:, :k]


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, grid: Grid) -> torch.Tensor:
    """The codes [N, K] of w on the grid (scale and zero per block, or already per column)."""
    k = w.shape[1]
    s = scale if scale.shape == w.shape else per_column(scale, k, grid)
    q = torch.round(w / s.to(w.dtype))
    if zero is not None:
        q = q + (zero if zero.shape == w.shape else per_column(zero, k, grid)).to(w.dtype)
    return q.clamp(grid.qmin, grid.qmax).to(grid.dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, grid: Grid) -> torch.Tensor:
    """(codes - zero) * scale in float32, [N, K]."""
    k = codes.shape[1]
    q = codes.to(torch.int32)
    if zero is not None:
        q = q - (zero if zero.shape == codes.shape else per_column(zero, k, grid)).to(torch.int32)
    s = scale if scale.shape == codes.shape else per_column(scale, k, grid)
    return q.to(torch.float32) * s.to(torch.float32)
