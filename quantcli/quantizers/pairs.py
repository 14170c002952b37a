"""The pairs of products ONNX Runtime's u8 x s8 kernels add in int16 on x86 without VNNI (numpy only).

MLAS's AVX2 and AVX-512 (without VNNI) u8 x s8 kernels multiply with vpmaddubsw: two adjacent
products a[k]*w[k] + a[k+1]*w[k+1] (k even, in the kernel's K order) are added and saturated to
int16 before the int32 accumulation. The K order is the weight's input axis for MatMul/Gemm and,
for QLinearConv, (kernel position, input channel of the group) with the input channel fastest
(see docs/cpu-targets.md). Activations are raw uint8 there (the zero point is subtracted later), so
a pair can overflow only when both weights have the same sign: |q[k] + q[k+1]| * 255 > 32767.
"""

from __future__ import annotations

import numpy as np

INT16_MIN, INT16_MAX = -32768, 32767
U8_MAX = 255
# The largest |q[k] + q[k+1]| of same-sign weights no uint8 activation can overflow: 128 * 255 = 32640.
PAIR_LIMIT = 128


def k_rows(w: np.ndarray, out_axis: int, conv: bool) -> np.ndarray:
    """The weight as (output channels, K) with each row in the kernel's K order.

    conv: (out, in/groups, *kernel) -> (out, *kernel, in/groups): the input channel fastest.
    Otherwise the output axis moves first and the rest, K last (Linear (out, in); MatMul (..., K, N)).
    """
    w = np.moveaxis(np.asarray(w), out_axis, 0)
    if conv and w.ndim > 2:
        w = np.moveaxis(w, 1, -1)
    return w.reshape(w.shape[0], -1)


def _pairs(rows: np.ndarray) -> np.ndarray:
    """(channels, K/2, 2): the pairs the kernel adds, K padded with a zero when odd (MLAS pads K)."""
    if rows.shape[1] % 2:
        rows = np.concatenate([rows, np.zeros((rows.shape[0], 1), rows.dtype)], axis=1)
    return rows.reshape(rows.shape[0], -1, 2)


def same_sign_sums(rows: np.ndarray) -> np.ndarray:
    """(channels, K/2): per pair, the larger of the sums of its positive and of its negative parts' magnitudes."""
    pairs = _pairs(np.asarray(rows, dtype=np.float64))
    return np.maximum(np.clip(pairs, 0, None).sum(-1), -np.clip(pairs, None, 0).sum(-1))


def pair_bound(rows: np.ndarray) -> np.ndarray:
    """Per output channel, the largest same-sign pair sum: the scale must map it to at most PAIR_LIMIT."""
    return same_sign_sums(rows).max(axis=1)


def saturable(q_rows: np.ndarray) -> np.ndarray:
    """(channels, K/2) bool: the int8 pairs some uint8 activation (255 at worst) overflows in int16."""
    pairs = _pairs(np.asarray(q_rows, dtype=np.int64))
    high = U8_MAX * np.clip(pairs, 0, None).sum(-1)
    low = U8_MAX * np.clip(pairs, None, 0).sum(-1)
    return (high > INT16_MAX) | (low < INT16_MIN)
