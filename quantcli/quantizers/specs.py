"""QuantizationSpecs for one resolved setting: activations, weights (per axis)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial

import torch
from torchao.quantization.pt2e.fake_quantize import FakeQuantize
from torchao.quantization.pt2e.observer import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
)
from torchao.quantization.pt2e.quantizer import (
    DerivedQuantizationSpec,
    FixedQParamsQuantizationSpec,
    QuantizationSpec,
)

from quantcli.quantizers.cpu import PAIR_SAFE
from quantcli.quantizers.observers import (
    ACTIVATION_OBSERVERS,
    CodedScalePerChannelObserver,
    PairSafeObserver,
    PairSafePerChannelObserver,
)

_EPS = 2**-12


@dataclass(frozen=True)
class Setting:
    """Everything that decides how one node's tensors are quantized (hashable)."""

    act_dtype: str  # uint8 | int8
    act_symmetric: bool
    observer: str
    w_per_channel: bool
    w_symmetric: bool
    reduce_range: bool | str  # True: 7-bit; False: 8-bit; PAIR_SAFE: 8-bit narrowed per channel where pairs need it
    qat: bool


@cache
def activation_spec(s: Setting) -> QuantizationSpec:
    dtype, qmin, qmax = (torch.uint8, 0, 255) if s.act_dtype == "uint8" else (torch.int8, -128, 127)
    qscheme = torch.per_tensor_symmetric if s.act_symmetric else torch.per_tensor_affine
    if s.qat:  # moving-average ranges under plain FakeQuantize (see FIELD-NOTES: QAT)
        ctr = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=_EPS)
    else:
        ctr = ACTIVATION_OBSERVERS[s.observer].with_args(eps=_EPS)
    return QuantizationSpec(
        dtype=dtype, quant_min=qmin, quant_max=qmax, qscheme=qscheme, observer_or_fake_quant_ctr=ctr
    )


@cache
def unit_range_spec(s: Setting) -> FixedQParamsQuantizationSpec:
    """A value that lies in [0, 1] whatever the input (a hardsigmoid gate): that range, uncalibrated.

    A calibrated range can only be narrower, and clips the gates that are fully open or shut.
    """
    if s.act_dtype == "uint8":
        return FixedQParamsQuantizationSpec(torch.uint8, 1 / 255, 0, 0, 255, torch.per_tensor_affine)
    if s.act_symmetric:
        return FixedQParamsQuantizationSpec(torch.int8, 1 / 127, 0, -128, 127, torch.per_tensor_symmetric)
    return FixedQParamsQuantizationSpec(torch.int8, 1 / 255, -128, -128, 127, torch.per_tensor_affine)


def _weight_range(s: Setting, pairs: str | None) -> tuple[int, bool]:
    """(bits, pair-safe) of a weight: pair-safe only where the layer runs in a pairing u8 x s8 kernel.

    Asymmetric weights have no pair-safe scale here: they keep reduce_range's 7 bits there.
    """
    if s.reduce_range is True:
        return 7, False
    if s.reduce_range == PAIR_SAFE and pairs is not None:
        return (8, True) if s.w_symmetric else (7, False)
    return 8, False


@cache
def weight_spec(s: Setting, axis: int, pairs: str | None = None) -> QuantizationSpec:
    """int8 weights; `axis` is the output-channel axis (used when per-channel).

    `pairs` says how ORT's u8 x s8 kernel orders this layer's K (quantcli.quantizers.pairs): "conv",
    "matrix", or None where the layer never runs in it (depthwise conv, ConvTranspose).
    """
    bits, pair_safe = _weight_range(s, pairs)
    if s.w_symmetric:
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1  # -127..127 or -63..63
    else:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    conv = {"conv": pairs == "conv"} if pair_safe else {}
    if s.w_per_channel:
        qscheme = torch.per_channel_symmetric if s.w_symmetric else torch.per_channel_affine
        observer, ch_axis = (PairSafePerChannelObserver if pair_safe else PerChannelMinMaxObserver), axis
    else:
        qscheme = torch.per_tensor_symmetric if s.w_symmetric else torch.per_tensor_affine
        observer, ch_axis = (PairSafeObserver if pair_safe else MinMaxObserver), None
        if pair_safe:
            conv["out_axis"] = axis
    if s.qat:
        extra = {"ch_axis": axis} if s.w_per_channel else {}
        ctr = FakeQuantize.with_args(observer=observer, eps=_EPS, **extra, **conv)
    else:
        ctr = observer.with_args(eps=_EPS, **conv)
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=qmin,
        quant_max=qmax,
        qscheme=qscheme,
        ch_axis=ch_axis,
        observer_or_fake_quant_ctr=ctr,
    )


@cache
def embedding_spec(s: Setting) -> QuantizationSpec:
    """An embedding table: int8 symmetric per row (axis 0), always 8-bit and per row.

    A Gather multiplies nothing, so no u8 x s8 kernel can saturate (no reduce_range). With a scale
    per row, a row of small values (a rare token's) keeps its resolution beside a row of large ones
    ([CLS]'s), where ORT's per-tensor table gives them the same step; the scales sit on a grid of
    256 values, so the file stores one byte per row (observers.CodedScalePerChannelObserver).
    """
    ctr = CodedScalePerChannelObserver.with_args(eps=_EPS)
    if s.qat:
        ctr = FakeQuantize.with_args(observer=CodedScalePerChannelObserver, eps=_EPS, ch_axis=0)
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=-127,
        quant_max=127,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        observer_or_fake_quant_ctr=ctr,
    )


def _bias_qparams(obs_or_fqs):
    """int32 bias scale = activation scale x weight scale (per channel), zero point 0."""
    act_scale, _ = obs_or_fqs[0].calculate_qparams()
    w_scale, _ = obs_or_fqs[1].calculate_qparams()
    scale = (act_scale * w_scale).float().reshape(-1)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def bias_spec(s: Setting, x, weight) -> DerivedQuantizationSpec:
    """int32 bias derived from the input edge `x` and weight edge `weight` (node pairs)."""
    qscheme = torch.per_channel_symmetric if s.w_per_channel else torch.per_tensor_symmetric
    return DerivedQuantizationSpec(
        derived_from=[x, weight],
        derive_qparams_fn=_bias_qparams,
        dtype=torch.int32,
        quant_min=-(2**31),
        quant_max=2**31 - 1,
        qscheme=qscheme,
        ch_axis=0 if s.w_per_channel else None,
    )


def _scaled_qparams(factor: float, obs_or_fqs):
    """The input's parameters with the scale times `factor` (> 0), the zero point kept."""
    scale, zero_point = obs_or_fqs[0].calculate_qparams()
    return scale * factor, zero_point


def scaled_spec(s: Setting, edge, factor: float) -> DerivedQuantizationSpec:
    """The output of x * factor (factor > 0) quantized as x is, its scale times factor.

    Then DQ(x) -> Mul -> Q equals no op at all on the integers: quantcli.onnx.rewrite removes it.
    """
    dtype, qmin, qmax = (torch.uint8, 0, 255) if s.act_dtype == "uint8" else (torch.int8, -128, 127)
    qscheme = torch.per_tensor_symmetric if s.act_symmetric else torch.per_tensor_affine
    return DerivedQuantizationSpec(
        derived_from=[edge],
        derive_qparams_fn=partial(_scaled_qparams, factor),
        dtype=dtype,
        quant_min=qmin,
        quant_max=qmax,
        qscheme=qscheme,
    )
