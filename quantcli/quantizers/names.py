"""The activation calibration methods a recipe may name, without importing torch.

`quantcli.recipe` validates `quantization.observer` and `overrides[].observer` against
OBSERVERS (so `quantcli validate` stays instant); `quantcli.quantizers.observers` maps each
name to its observer class, and a test checks that the two agree.
"""

from __future__ import annotations

OBSERVERS: tuple[str, ...] = (
    "minmax",  # running min and max
    "moving_average_minmax",  # min and max averaged over batches
    "histogram",  # torchao's greedy search for the range of least L2 error on a 2048-bin histogram
    "mse",  # the same observer as histogram, named for what it minimizes
    "percentile",  # histogram clipped at the 0.01th and 99.99th percentiles
    "entropy",  # the KL-divergence optimal range, as TensorRT and ONNX Runtime calibrate
)
