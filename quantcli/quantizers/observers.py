"""Observers by recipe name, and the percentile observer quantcli adds to torchao's.

The names are those of quantcli.quantizers.names (torch-free, for recipe validation). `mse` is
torchao's HistogramObserver under the name of what it does: it keeps the range whose 8-bit
quantization has the least L2 error on the histogram, found greedily (it narrows the range from
whichever end holds less mass and stops when its error estimate grows; tests/test_observers.py
holds it to a brute-force optimum). Its estimate spreads each bin's values evenly, so the exact
zeros of a ReLU output count as error: there it can land at up to 1.35x the optimum's MSE where
minmax stays within 1.07x (Laplace through ReLU, 100k values, 5 seeds).
"""

from __future__ import annotations

import torch
from torchao.quantization.pt2e.observer import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
)

from quantcli.quantizers.entropy import EntropyObserver


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


ACTIVATION_OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average_minmax": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
    "mse": HistogramObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
}
