"""The quantization targets and activation calibration methods a recipe may name, without importing torch.

`quantcli.recipe` validates `quantization.target` (and the options a target ignores),
`quantization.observer` and `overrides[].observer` against these (so `quantcli validate` stays
instant); `quantcli.quantizers` gives each target its quantizer factory and
`quantcli.quantizers.observers` each observer name its class; tests check that they agree.
"""

from __future__ import annotations

OBSERVERS: tuple[str, ...] = (
    "auto",  # histogram's search or min to max for the whole model, by the output error on held-out batches
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

# Weight-only quantization (`activations: none`): weight dtypes, methods and the block sizes ORT runs.
WEIGHT_DTYPES: tuple[str, ...] = ("int8", "int4")
WEIGHT_METHODS: tuple[str, ...] = (
    "rtn",  # round to nearest on each block's min/max grid; needs no data
    "gptq",  # Frantar et al. 2022: error feedback through each linear's input Hessian (act-order, damping)
    "awq",  # Lin et al. 2023: per-input-channel scales from activation magnitudes, searched on the output error
)
WEIGHT_METHODS_WITH_DATA = frozenset({"gptq", "awq"})  # those calibrate collects statistics for
# K elements sharing one scale: powers of two ORT fuses into MatMulNBits and its CPU kernels run.
BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128, 256)
