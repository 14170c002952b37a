"""Quantization targets: a registry of PT2E quantizers, configured from the recipe or a plain config.

`resolve` fills the recipe's "auto" values from the local CPU; `build` returns the
torchao Quantizer for a resolved `QuantizationSection`, or for a `QuantizerConfig` (plain values,
no recipe: the onnxruntime quantizer as a library). torch and torchao are imported
only inside the target factories, so importing this package stays instant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantcli.errors import RecipeError
from quantcli.quantizers import names
from quantcli.quantizers.config import QuantizerConfig
from quantcli.quantizers.cpu import PAIR_SAFE, detect_cpu, saturates_u8s8

if TYPE_CHECKING:  # pragma: no cover
    from torchao.quantization.pt2e.quantizer import Quantizer

    from quantcli.recipe import QuantizationSection


def _onnxruntime(q: QuantizationSection, qat: bool) -> Any:
    from quantcli.quantizers.onnxruntime import OnnxRuntimeQuantizer

    return OnnxRuntimeQuantizer(q, qat=qat)


def _x86_inductor(q: QuantizationSection, qat: bool) -> Any:
    from quantcli.quantizers.x86_inductor import x86_inductor_quantizer

    return x86_inductor_quantizer(q, qat=qat)


@dataclass(frozen=True)
class Target:
    """A quantization target: its quantizer factory and the `quantization:` options it reads."""

    factory: Callable[[QuantizationSection, bool], Any]
    options: frozenset[str] | None  # None: every option of the section


# The registry: the names and the options each target reads are quantizers.names' (the recipe schema
# validates against those); this package imports no torch at import time.
_FACTORIES = {"onnxruntime": _onnxruntime, "x86_inductor": _x86_inductor}
TARGETS: dict[str, Target] = {name: Target(_FACTORIES[name], options) for name, options in names.TARGETS.items()}


def resolve(q: QuantizationSection) -> QuantizationSection:
    """Return a copy with target_cpu "auto" replaced by this CPU's class and reduce_range "auto" by what
    the target needs: pair-safe weights where ORT's u8 x s8 kernels add pairs in int16, else 8-bit."""
    cpu = detect_cpu() if q.target_cpu == "auto" else q.target_cpu
    reduce_range: bool | str = q.reduce_range
    if reduce_range == "auto":
        reduce_range = PAIR_SAFE if saturates_u8s8(cpu) else False
    return q.model_copy(update={"target_cpu": cpu, "reduce_range": reduce_range})


def build(q: QuantizationSection | QuantizerConfig, *, qat: bool = False) -> Quantizer:
    """The torchao Quantizer of the target `q.target` (validated by the schema); a section must be resolved,
    a QuantizerConfig is resolved for this machine here."""
    if isinstance(q, QuantizerConfig):
        q = resolve(q.section())
    if q.target_cpu == "auto" or q.reduce_range == "auto":
        raise RecipeError(
            "quantization: target_cpu/reduce_range are still 'auto'",
            "call quantcli.quantizers.resolve() on the section first",
        )
    return TARGETS[q.target].factory(q, qat)
