"""The quantization targets and activation calibration methods a recipe may name, without importing torch.

`quantcli.recipe` validates `quantization.target` (and the options a target ignores),
`quantization.observer` and `overrides[].observer` against these (so `quantcli validate` stays
instant); `quantcli.quantizers` gives each target its quantizer factory and
`quantcli.quantizers.observers` each observer name its class; tests check that they agree.
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

# target -> the `quantization:` options it reads (None: every option of the section)
TARGETS: dict[str, frozenset[str] | None] = {
    "onnxruntime": None,  # quantcli's own quantizer for ONNX Runtime's integer kernels
    "x86_inductor": frozenset(),  # torchao's X86InductorQuantizer with its default configuration
}
