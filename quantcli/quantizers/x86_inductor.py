"""torchao's X86InductorQuantizer with its default configuration."""

from __future__ import annotations

from quantcli.recipe import QuantizationSection


def x86_inductor_quantizer(q: QuantizationSection, *, qat: bool):
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config(is_qat=qat)
    return X86InductorQuantizer().set_global(config)
