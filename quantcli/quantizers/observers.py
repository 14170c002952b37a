"""Observers by recipe name, and the percentile observer quantcli adds to torchao's.

The names are those of quantcli.quantizers.names (torch-free, for recipe validation). `mse` is
torchao's HistogramObserver under the name of what it does: it keeps the range whose 8-bit
quantization has the least L2 error on the histogram, found greedily (it narrows the range from
whichever end holds less mass and stops when its error estimate grows; tests/test_observers.py
holds it to a brute-force optimum). Its estimate spreads each bin's values evenly, so the exact
zeros of a ReLU output counted as error; quantcli's subclass counts none for them (HistogramObserver).
"""

from __future__ import annotations

import torch
from torchao.quantization.pt2e.observer import HistogramObserver as _TorchaoHistogramObserver
from torchao.quantization.pt2e.observer import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
)

from quantcli.quantizers.counting import histc
from quantcli.quantizers.entropy import EntropyObserver
from quantcli.quantizers.pairs import PAIR_LIMIT, k_rows, pair_bound

# torch.histc counts in the input's dtype: in float32 a bin stops counting at 2**24 (in each thread's
# share), so a ReLU output's zero bin in a large batch came out short, and by how much depended on the
# thread count. A larger tensor was therefore counted in float64, which also bins it in float64; the counts
# are now exact in any dtype (quantcli.quantizers.counting), and such a tensor is still binned in float64, so
# that every calibrated range stays what it was.
EXACT_FLOAT32_COUNTS = 2**24


class HistogramObserver(_TorchaoHistogramObserver):
    """torchao's HistogramObserver, with exact counts at a third of torch.histc's time, and no error counted for a
    ReLU output's zeros.

    torchao's error estimate spreads each bin's values evenly over the bin, so the first bin of a ReLU
    output (half its values or more, all exact zeros) counted an error that grows with the range: the search
    clipped the range short, to up to 1.19x the optimum's uint8 MSE where minmax stays within 1.07x. Where
    the observed minimum is exactly 0 and the range starts there, zero is on the uint8 grid (zero point 0)
    and that bin's values count no error: 1.01-1.07x (Laplace through ReLU, 100k values, seeds 0-4).
    """

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """torchao's forward, step for step, with torch.histc's counts from quantcli.quantizers.counting (the same
        bins, exact, in a third of the time), and a float32 tensor of more than 2**24 values binned in float64."""
        x = x_orig.detach()
        if x.numel() == 0 or x.dtype != torch.float32:
            return super().forward(x_orig)
        dtype = torch.float64 if x.numel() > EXACT_FLOAT32_COUNTS else torch.float32
        x_min, x_max = (v.to(dtype) for v in torch.aminmax(x))
        if not (torch.isfinite(x_min) and torch.isfinite(x_max)):  # torchao's handling of inf (and NaN)
            super().forward(x.to(dtype))
            return x_orig
        first = self.min_val == float("inf") or self.max_val == float("-inf")
        new_min = x_min if first else torch.min(self.min_val, x_min).detach()
        new_max = x_max if first else torch.max(self.max_val, x_max).detach()
        update = histc(x, self.bins, float(new_min), float(new_max), dtype, extrema=(x_min, x_max)).to(dtype)
        if first:
            combined = update
        elif new_min == self.min_val and new_max == self.max_val:
            combined = self.histogram + update
        else:
            combined = self._combine_histograms(self.histogram, self.min_val, self.max_val, update, new_min, new_max)
        self.histogram.detach_().resize_(combined.shape).copy_(combined)
        self.min_val.detach_().resize_(new_min.shape).copy_(new_min)
        self.max_val.detach_().resize_(new_max.shape).copy_(new_max)
        return x_orig

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        """torchao's range search, step for step, with the cumulative histogram read as Python floats.

        torchao's loop indexes a tensor for every bin it passes, for each of up to 10**5 quantile steps: 14 s
        of the 37 that convert took on a small EVA-02 (710 observers), 1.4 s this way (convert: 21 s). Each
        comparison is made as torch makes it, the bound rounded to the histogram's dtype, so the range is the
        same to the bit (tests/test_observers.py, against torchao's own on made histograms; the same on all
        710 of EVA-02's, where comparing in float64 differs on 4).
        """
        assert self.histogram.size()[0] == self.bins, "bins mismatch"
        bin_width = (self.max_val - self.min_val) / self.bins
        total = torch.sum(self.histogram).item()
        cumulative = torch.cumsum(self.histogram, dim=0).cpu()
        in_dtype = cumulative.numpy().dtype.type  # a tensor element against a Python float: in the tensor's dtype
        counts = cumulative.tolist()
        stepsize, alpha, beta = 1e-5, 0.0, 1.0  # torchao's granularity and quantile bounds
        start_bin, end_bin = 0, self.bins - 1
        norm_min = float("inf")
        while alpha < beta:
            next_alpha, next_beta = alpha + stepsize, beta - stepsize
            low, high = float(in_dtype(next_alpha * total)), float(in_dtype(next_beta * total))
            left, right = start_bin, end_bin
            while left < end_bin and counts[left] < low:
                left += 1
            while right > start_bin and counts[right] > high:
                right -= 1
            next_start_bin, next_end_bin = start_bin, end_bin
            if left - start_bin > end_bin - right:  # move the end with more mass outside it
                next_start_bin, alpha = left, next_alpha
            else:
                next_end_bin, beta = right, next_beta
            if next_start_bin == start_bin and next_end_bin == end_bin:
                continue
            norm = self._compute_quantization_error(next_start_bin, next_end_bin)
            if norm > norm_min:
                break
            norm_min, start_bin, end_bin = norm, next_start_bin, next_end_bin
        return self.min_val + bin_width * start_bin, self.min_val + bin_width * (end_bin + 1)

    def _compute_quantization_error(self, next_start_bin: int, next_end_bin: int):
        if next_start_bin != 0 or float(self.min_val) != 0.0:
            return super()._compute_quantization_error(next_start_bin, next_end_bin)
        zeros = self.histogram[0].clone()
        self.histogram[0] = 0  # exact zeros, and the few values within a bin's width of 0: on the grid
        try:
            return super()._compute_quantization_error(next_start_bin, next_end_bin)
        finally:
            self.histogram[0] = zeros


class ChosenRangeObserver(HistogramObserver):
    """The histogram observer, whose range is either the search's or the observed min to max (`observer: auto`).

    Calibrate picks one for the whole model from the output error on held-out calibration batches
    (quantcli.quantizers.range_choice) and records it in the `searched` buffer, so the state_dict carries the
    choice to convert; until then (and in a module prepared outside quantcli's calibrate) it is the search.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("searched", torch.tensor(True))

    @torch.jit.export
    def calculate_qparams(self):
        if bool(self.searched) or self.min_val == float("inf"):
            return super().calculate_qparams()
        return self._calculate_qparams(self.min_val, self.max_val)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs):
        """A state saved by a histogram observer (before the choice existed) loads as the search."""
        state_dict.setdefault(prefix + "searched", torch.tensor(True))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args, **kwargs)

    def extra_repr(self):
        return f"searched={bool(self.searched)}, " + super().extra_repr()


class PercentileObserver(HistogramObserver):
    """A histogram observer whose range is clipped at the 0.01th and 99.99th percentiles.

    Its state (histogram, min_val, max_val) is HistogramObserver's, so a state_dict saved
    after calibration loads with strict=True into a freshly prepared model.
    """

    def __init__(self, *args, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.upper = percentile / 100.0
        self.lower = 1.0 - self.upper

    @torch.jit.export
    def calculate_qparams(self):
        if self.min_val == float("inf") or self.histogram.sum() == 0:
            return super().calculate_qparams()
        hist = self.histogram.double()
        cdf = hist.cumsum(0) / hist.sum()
        width = (self.max_val.double() - self.min_val.double()) / self.bins
        lo = torch.searchsorted(cdf, torch.tensor([self.lower], dtype=torch.float64))[0]
        hi = torch.searchsorted(cdf, torch.tensor([self.upper], dtype=torch.float64))[0]
        new_min = self.min_val.double() + width * lo
        new_max = self.min_val.double() + width * torch.clamp(hi + 1, max=self.bins)
        return self._calculate_qparams(new_min.float(), new_max.float())

    def extra_repr(self):
        return f"percentile={self.upper * 100:g}, " + super().extra_repr()


class _PairSafe:
    """Widens a symmetric weight observer's range so that no pair the u8 x s8 kernel adds can overflow int16.

    The recorded range becomes, per output channel, max(|w|, s * quant_max / (PAIR_LIMIT - 0.5)) where
    s is the channel's largest same-sign pair sum (quantcli.quantizers.pairs): the scale then maps every
    such pair to at most 127.5, which rounds to at most PAIR_LIMIT (128). Exact and data-free; the
    state is the base observer's (min_val, max_val), so state_dicts load as before, and convert (PTQ or
    QAT's FakeQuantize) computes its scale from this very range.
    """

    def _widen(self, w: torch.Tensor) -> torch.Tensor | None:
        if w.numel() == 0:
            return None
        rows = k_rows(w.detach().float().cpu().numpy(), self.out_axis, self.conv)
        bound = torch.from_numpy(pair_bound(rows)).to(self.max_val.dtype)
        return bound * (self.quant_max / (PAIR_LIMIT - 0.5))


class PairSafePerChannelObserver(_PairSafe, PerChannelMinMaxObserver):
    def __init__(self, *args, conv: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv, self.out_axis = conv, self.ch_axis

    def forward(self, x_orig):
        out = super().forward(x_orig)
        reach = self._widen(x_orig)
        if reach is not None:
            self.max_val.copy_(torch.maximum(self.max_val, reach))
            self.min_val.copy_(torch.minimum(self.min_val, -reach))
        return out


class PairSafeObserver(_PairSafe, MinMaxObserver):
    """Per-tensor: one range wide enough for every output channel's pairs."""

    def __init__(self, *args, conv: bool = False, out_axis: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv, self.out_axis = conv, out_axis

    def forward(self, x_orig):
        out = super().forward(x_orig)
        reach = self._widen(x_orig)
        if reach is not None:
            top = reach.max()
            self.max_val.copy_(torch.maximum(self.max_val, top))
            self.min_val.copy_(torch.minimum(self.min_val, -top))
        return out


class CodedScalePerChannelObserver(PerChannelMinMaxObserver):
    """Per-channel scales rounded up onto a grid STEPS to the octave below the largest: 256 values at most.

    An embedding table's scale per row then takes one byte in the exported file (quantcli.onnx.rewrite
    stores each row's grid index and the grid), not four: 0.26 % of a 384-wide int8 table instead of 1 %.
    A row's step grows by at most 2^(1/16) (4.4 %, 0.4 dB); rows over 2^16 times smaller than the largest
    share the grid's last value. The state is PerChannelMinMaxObserver's.
    """

    STEPS = 16

    @torch.jit.export
    def calculate_qparams(self):
        scale, zero_point = super().calculate_qparams()
        top = scale.max()
        k = torch.floor(torch.log2(top / scale) * self.STEPS).clamp(0, 255)
        return top * torch.exp2(-k / self.STEPS), zero_point


ACTIVATION_OBSERVERS = {
    "auto": ChosenRangeObserver,
    "minmax": MinMaxObserver,
    "moving_average_minmax": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
    "mse": HistogramObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
}
