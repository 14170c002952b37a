"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize a weight column by column, each column's rounding error spread over the columns
not yet quantized through the inverse of the layer's input Hessian H = sum of x x^T, so that
||X W^T - X Q^T||^2 stays small.

As the paper's Algorithm 1: H damped by `damp` times its mean diagonal, the upper Cholesky factor of
H^-1, lazy batch updates of `lazy` columns. Act-order: columns are processed by decreasing H diagonal
(the inputs with the most energy first). The grid's scales are fitted per block on the weight before
any update ("static groups"), each block's of least error on its own output contribution
(quantcli.weightonly.clipping, the clip search AWQ's code runs): every column keeps its own block's
scale whatever the processing order, so the result is stored in the standard [K, N] blocked layout,
with no column permutation to carry.
Inputs that were always zero (a zero H diagonal) get H_ii = 1 and a zero weight, as the reference code.
Runs in float64: deterministic, and the same codes as a plain reimplementation of the algorithm.
"""

from __future__ import annotations

import torch

from quantcli.weightonly.clipping import clipped_fit
from quantcli.weightonly.grid import Grid, dequantize, per_column, quantize
from quantcli.weightonly.result import Quantized

DAMP = 0.01  # of the mean diagonal of H (the paper's lambda)
LAZY = 128  # columns per lazy batch update


def gptq(w: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, damp: float = DAMP, lazy: int = LAZY) -> Quantized:
    n, k = w.shape
    W = w.double().clone()
    H = hessian.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scale, zero = clipped_fit(W.float(), H, grid)  # static groups: each block's grid before any update
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    W, H = W[:, order], H[order][:, order]
    H += damp * torch.diagonal(H).mean() * torch.eye(k, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    S = per_column(scale, k, grid)[:, order]
    Z = None if zero is None else per_column(zero, k, grid)[:, order]
    codes = torch.empty((n, k), dtype=grid.dtype)
    for start in range(0, k, lazy):
        end = min(start + lazy, k)
        block, errors = W[:, start:end].clone(), torch.zeros((n, end - start), dtype=W.dtype)
        for i in range(end - start):
            col = slice(start + i, start + i + 1)
            q = quantize(block[:, i : i + 1], S[:, col], None if Z is None else Z[:, col], grid)
            codes[:, col] = q
            err = block[:, i] - dequantize(q, S[:, col], None if Z is None else Z[:, col], grid)[:, 0].double()
            err = err / U[start + i, start + i]
            block[:, i:] -= err[:, None] * U[start + i, start + i : end][None, :]
            errors[:, i] = err
        W[:, end:] -= errors @ U[start:end, end:]
    return Quantized(grid, codes[:, torch.argsort(order)], scale, zero)
