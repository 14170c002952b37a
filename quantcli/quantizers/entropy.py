"""KL-divergence (entropy) calibration: TensorRT's algorithm, step for step as ONNX Runtime runs it.

The observer accumulates a histogram of fixed size over [-T, T], T the largest |x| seen so far
(ORT's `HistogramCollector.collect_value`). When a batch raises T, the histogram is re-binned
onto the wider range, so memory stays `bins` counts whatever the number of batches; ORT instead
histograms all calibration outputs at once, which the observer reproduces exactly while the
first batch holds the largest |x|.

At `calculate_qparams` every candidate threshold i (bins zero-i .. zero+i, zero = bins // 2) is
scored as ORT 1.32's `HistogramCollector.get_entropy_threshold` scores it, and the range with
the smallest KL divergence wins, clamped to the observed min and max. ORT departs from the
MXNet/TensorRT reference it cites in three places, reproduced here because quantcli promises
ORT's ranges: the expanded candidate q is truncated to integers, q is not zeroed where the
reference p is empty, and the bins past the last whole group of merged bins get q = 0.

Asymmetric uint8 (quantcli's default) follows ORT too: its calibrator returns
(max(-t, min), min(t, max)) and its quantizer derives scale and zero point from that range
widened to hold 0, which is what torchao's arithmetic does with the range returned here. A ReLU
output (min 0) thus gets [0, t] on 256 levels, a signed tensor [-t, t] (or less where the data
stop short). The KL is measured with `quantized_bins` = 128 levels over [-t, t], ORT's default,
whatever the dtype: 64 of them on a ReLU output's [0, t], so entropy clips harder than uint8
needs, as it does in ORT (TensorRT scores 128 levels over |x|).
"""

from __future__ import annotations

import math

import torch
from torchao.quantization.pt2e.observer import UniformQuantizationObserverBase

from quantcli.quantizers.counting import histc

_SMOOTHING = 1e-4  # ORT's smooth_distribution eps
_CHUNK = 256  # candidate thresholds scored at once: bounds the work matrices to 256 x bins


class EntropyObserver(UniformQuantizationObserverBase):
    """Per-tensor range that minimizes the KL divergence of a `quantized_bins`-level quantization.

    State: `histogram` (`bins` float64 counts, integer-valued), `min_val`, `max_val` (and the
    base class's `eps`), all shaped at construction, so a state_dict saved after calibration
    loads with strict=True into a freshly prepared model in another process.
    """

    histogram: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, bins: int = 2048, quantized_bins: int = 128, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.qscheme not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise ValueError(f"EntropyObserver is per-tensor only, got {self.qscheme}")
        if bins % 2 or quantized_bins % 2 or not 2 <= quantized_bins < bins:
            raise ValueError(f"need even bins > even quantized_bins >= 2, got {bins}, {quantized_bins}")
        self.bins, self.quantized_bins = bins, quantized_bins
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _half_range(self) -> float:
        """T: the histogram covers [-T, T]; 0 before any non-zero value was seen."""
        if self.min_val == float("inf"):
            return 0.0
        return max(-float(self.min_val), float(self.max_val))

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        x = x_orig.detach().float().reshape(-1)
        if x.numel() == 0:
            return x_orig
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):  # HistogramObserver drops infinities too
            x = x[torch.isfinite(x)]
            if x.numel() == 0:
                return x_orig
            lo, hi = torch.aminmax(x)
        old, new = self._half_range(), max(-float(lo), float(hi))
        if new > old:
            self.histogram.copy_(rebin(self.histogram, old, new))
        self.histogram += histogram(x, self.bins, max(old, new))
        self.min_val.copy_(torch.minimum(self.min_val, lo))
        self.max_val.copy_(torch.maximum(self.max_val, hi))
        return x_orig

    def calculate_qparams(self):
        if self.min_val == float("inf") or self._half_range() == 0.0:
            return self._calculate_qparams(self.min_val, self.max_val)  # default qparams, or those of all zeros
        lo, hi = self.threshold()
        return self._calculate_qparams(lo, hi)

    def threshold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated (min, max): ORT's entropy threshold, clamped to the observed range."""
        start, end = best_candidate(self.histogram, self.quantized_bins)
        width = 2 * self._half_range() / self.bins
        lo = torch.tensor(-self._half_range() + start * width).float()
        hi = torch.tensor(-self._half_range() + end * width).float()
        return torch.maximum(lo, self.min_val), torch.minimum(hi, self.max_val)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, quantized_bins={self.quantized_bins}, min_val={self.min_val}, max_val={self.max_val}"


def histogram(x: torch.Tensor, bins: int, half_range: float) -> torch.Tensor:
    """Counts of `x` in `bins` equal bins over [-half_range, half_range] (float64).

    All zeros (half_range 0) count in the bin that starts at 0, where they fall once the range grows.
    """
    if half_range == 0.0:
        counts = torch.zeros(bins, dtype=torch.float64)
        counts[bins // 2] = x.numel()
        return counts
    return histc(x, bins, -half_range, half_range).double()  # exact counts, where histc's stop at 2**24


def rebin(hist: torch.Tensor, old: float, new: float) -> torch.Tensor:
    """`hist` over [-old, old] redistributed onto the same number of bins over [-new, new] (new > old).

    Counts are taken as uniform within an old bin (as HistogramObserver's upsampling does), and the
    cumulative counts at the new edges are rounded, so the result stays whole counts with the same total.
    """
    bins = hist.numel()
    if old == 0.0:  # every value so far was 0: all of them go to the bin that starts at 0
        out = torch.zeros_like(hist)
        out[bins // 2] = hist.sum()
        return out
    cdf = torch.cat([hist.new_zeros(1), hist.cumsum(0)])
    edges = torch.linspace(-new, new, bins + 1, dtype=torch.float64)
    pos = ((edges + old) * (bins / (2 * old))).clamp(0, bins)  # new edges in old-bin units
    k = pos.floor().long().clamp(max=bins - 1)
    at_edges = (cdf[k] + (pos - k) * hist[k]).round()
    at_edges[0], at_edges[-1] = 0.0, cdf[-1]
    return at_edges.diff()


def best_candidate(hist: torch.Tensor, quantized_bins: int) -> tuple[int, int]:
    """(start, end) bin indices of the candidate range with the least KL divergence (the first on ties)."""
    bins = hist.numel()
    zero, half = bins // 2, quantized_bins // 2
    i = torch.arange(half, zero + 1)
    starts, ends = zero - i, torch.clamp(zero + i + 1, max=bins)
    kl = torch.cat(
        [
            kl_divergences(hist, starts[c : c + _CHUNK], ends[c : c + _CHUNK], quantized_bins)
            for c in range(0, len(i), _CHUNK)
        ]
    )
    best = int(torch.argmin(kl))
    return int(starts[best]), int(ends[best])


def kl_divergences(hist: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, levels: int) -> torch.Tensor:
    """KL(p || q) for each candidate slice hist[start:end] (one per row), as ORT computes it.

    p is the slice with everything outside it added to its end bins. q merges the slice into `levels`
    groups of `merged` bins (the last group also takes the slice's tail) and spreads each group's
    count over the group's non-empty p bins, truncated to an integer (ORT stores q in an int64 array);
    the tail bins get nothing. Both are smoothed (zeros become eps, taken from the non-zero bins).
    q is constant within a group, so only sum(p log p) needs the bins; the rest works on group sums.
    """
    length = ends - starts
    merged = length // levels  # >= 1: a candidate spans at least levels + 1 bins
    bounds = torch.cat([torch.arange(levels + 1) * merged[:, None], length[:, None]], 1)  # the groups, the tail
    p = _reference(hist, starts, ends)
    p_log_p, group_p, group_nonzero = _smoothed_p(p, bounds)
    q = _group_q(hist, starts, ends, bounds, group_nonzero)
    widths = bounds.diff()
    q_zero = (widths * (q == 0)).sum(1)
    eps1 = _SMOOTHING * q_zero / (length - q_zero).clamp(min=1)
    p_log_q = (group_p * torch.log(torch.where(q > 0, q - eps1[:, None], _SMOOTHING))).sum(1)
    mass, q_mass = p.sum(1), (widths * q).sum(1)
    kl = (p_log_p - p_log_q) / mass - torch.log(mass) + torch.log(q_mass)  # p, q normalized
    return torch.where(q_zero < length, kl, float("inf"))  # ORT: an all-zero q cannot be smoothed


def _reference(hist: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """p, one row per candidate: hist[start:end] with the counts left and right of it in its end bins,
    zero-padded to the longest slice of the rows."""
    length = ends - starts
    bins, rows = hist.numel(), torch.arange(len(starts))
    j = torch.arange(int(length.max()))
    cum = _cumsum0(hist)
    p = torch.where(j < length[:, None], hist[(starts[:, None] + j).clamp(max=bins - 1)], 0.0)
    p[:, 0] += cum[starts]
    p[rows, length - 1] += cum[-1] - cum[ends]
    return p


def _smoothed_p(p: torch.Tensor, bounds: torch.Tensor):
    """For p smoothed as ORT does (each of its z empty bins gets eps, each of its n others loses
    eps * z / n): sum(p log p), the mass in each group of `bounds`, and the non-empty bins per group.
    p always holds every count, so it is never all zero."""
    nonzero = p != 0
    length, n_nonzero = bounds[:, -1], nonzero.sum(1)
    eps1 = _SMOOTHING * (length - n_nonzero) / n_nonzero
    shifted = torch.where(nonzero, p - eps1[:, None], 1.0)
    p_log_p = (shifted * torch.log(shifted)).sum(1) + (length - n_nonzero) * _SMOOTHING * math.log(_SMOOTHING)
    group_nonzero = _cumsum0(nonzero.double()).gather(1, bounds).diff()
    empty = bounds.diff() - group_nonzero
    group_p = _cumsum0(p).gather(1, bounds).diff() + _SMOOTHING * empty - eps1[:, None] * group_nonzero
    return p_log_p, group_p, group_nonzero


def _group_q(hist, starts, ends, bounds, group_nonzero) -> torch.Tensor:
    """q in each bin of each group: the group's count of the slice (no outliers; the last group takes
    the tail's too) over its non-empty p bins, truncated to an integer; 0 in the tail's bins."""
    cum = _cumsum0(hist)
    edges = starts[:, None] + bounds[:, :-1]
    edges[:, -1] = ends
    counts = cum[edges].diff()
    q = torch.where(group_nonzero[:, :-1] > 0, torch.floor(counts / group_nonzero[:, :-1].clamp(min=1)), 0.0)
    return torch.cat([q, q.new_zeros(len(q), 1)], 1)


def _cumsum0(rows: torch.Tensor) -> torch.Tensor:
    """Cumulative sums along the last axis with a leading 0: sums of [a, b) are c[b] - c[a]."""
    return torch.cat([rows.new_zeros(*rows.shape[:-1], 1), rows.cumsum(-1)], -1)
