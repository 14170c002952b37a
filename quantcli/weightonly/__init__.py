"""Weight-only quantization (`activations: none`): int4/int8 weights of linears, activations float.

The stages, as for static quantization: prepare plans the linears (`plan`) and, for methods that
need data (GPTQ, AWQ), inserts input statistics collectors (`collect`); calibrate streams the data
through them; convert quantizes each linear by its method (`methods`: rtn, gptq, awq, on `grid`)
into the PyTorch weight-only model and the codes (`apply`); export stores the codes in the ONNX file
in the layout ONNX Runtime runs as MatMulNBits (quantcli.onnx.blocked).
"""

from __future__ import annotations

from typing import Any

from quantcli.recipe import QuantizationSection


def prepare(module: Any, q: QuantizationSection) -> Any:
    """The captured module with the statistics collectors its methods need (none for RTN)."""
    from quantcli.weightonly import collect, plan

    collect.insert(module, plan.layers(module, q))
    return module
