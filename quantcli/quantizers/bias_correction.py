"""Empirical bias correction: each conv's (and each 2-D linear's) bias takes back the mean shift quantization adds.

Rounding the weights and clipping the activations shift the mean of a layer's output by channel, and the shift
carries to every later layer: a search that clips a tensor's rare large values for resolution lowers the mean
of what the next layer reads. The float means come from the first calibration batch's own forward (observers
pass their input through); after the last batch that batch is run again fake-quantized with the convert's
arithmetic, layer after layer in graph order. At each corrected layer the per-channel mean of its fake-quantized
output is compared with the float one, the difference is taken from the layer's bias, and the corrected output
goes on to the layers after it, so that each layer's correction sees those before it corrected (a correction of
every layer at once from one uncorrected pass over-corrects: each layer's shift partly comes from those before).

Only biases the graph reads as parameters, each in one place, are corrected (a conv without a bias and without a
BatchNorm folded into it has none; a layer called twice shares its bias between two outputs), and of the linears
only those with a 2-D output (a classifier's head), not those run on the rows of a token or channels-last tensor:
on the sweep's transformers that correction moved no SQNR by more than 0.1 dB, and it made zero biases nonzero,
so the int32 codes no longer narrowed (MobileBERT's file grew past ORT's). The float reference of a report keeps
the original values (`stages.base.restore_prepared`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torchao.quantization.pt2e.observer import ObserverBase

aten = torch.ops.aten
_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
_LINEAR = aten.linear.default
_RESHAPES = (aten.reshape.default, aten.view.default)
_INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.quint8, torch.qint8, torch.qint32)
_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


class _FakeQuant(torch.nn.Module):
    """Quantize then dequantize with an observer's parameters, as convert's QuantizeLinear/DequantizeLinear:
    8-bit values per tensor with the converted program's own arithmetic (torchao's quantize_per_tensor and
    dequantize_per_tensor: x * (1 / scale), rounded, shifted, clamped, shifted back, times scale; the shifts by
    the integer zero point are exact, so the clamp is shifted instead) on one buffer, in place; per channel
    through torch's fused fake-quantize kernel; int32 values in float64 (which holds them all).

    torch's per-tensor kernel gives the same values (its float32 1 / scale is the correctly rounded quotient the
    float64 one rounds to) in 2.2x the time (229 against 105 ms on 38.5 million values, EPYC with AVX2, 2 threads,
    medians of 21 interleaved), with a mask no one reads: the fake-quantized passes are a fifth of calibrate's
    time on a CNN's large activations.
    """

    def __init__(self, obs: Any) -> None:
        super().__init__()
        scale, zero_point = obs.calculate_qparams()
        self.wide = obs.dtype in (torch.int32, torch.qint32)
        self.qmin, self.qmax = obs.quant_min, obs.quant_max
        self.axis = obs.ch_axis if getattr(obs, "qscheme", None) in _PER_CHANNEL else None
        if self.wide:
            self.scale, self.zero_point = scale.double(), zero_point.double()
        elif self.axis is None:
            self.scale, self.zero_point = float(scale), int(zero_point)
        else:
            self.scale, self.zero_point = scale.float(), zero_point.int()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.wide:
            if self.axis is None:
                out = x * (1.0 / self.scale)  # + zero point, clamped, - zero point: the clamp shifted (exact)
                return out.round_().clamp_(self.qmin - self.zero_point, self.qmax - self.zero_point).mul_(self.scale)
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.axis % x.dim(), self.qmin, self.qmax
            )
        scale, zero_point = self.scale, self.zero_point
        if self.axis is not None:
            shape = [1] * x.dim()
            shape[self.axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        q = torch.clamp(torch.round(x.double() / scale) + zero_point, self.qmin, self.qmax)
        return ((q - zero_point) * scale).to(x.dtype)


def fake_quant(obs: Any) -> torch.nn.Module:
    """The observer as the convert will compute it (an observer of floats, e.g. a float override: nothing)."""
    if obs.dtype not in _INTEGER or obs.quant_min is None:
        return torch.nn.Identity()
    return _FakeQuant(obs)


@contextlib.contextmanager
def observers_replaced(module: Any, make: Any) -> Iterator[None]:
    """Every observer the graph calls replaced by `make(observer)`; the observers back on exit."""
    names = sorted(
        {
            n.target
            for n in module.graph.nodes
            if n.op == "call_module" and isinstance(module.get_submodule(n.target), ObserverBase)
        }
    )
    observers = {name: module.get_submodule(name) for name in names}
    try:
        for name, obs in observers.items():
            setattr(module, name, make(obs))
        yield
    finally:
        for name, obs in observers.items():
            setattr(module, name, obs)


def _bias_name(module: Any, node: Any) -> str | None:
    """The parameter a conv or linear node reads as its bias (directly, or through an int32 observer, whose range
    derives from the input's and the weight's, not from the bias), or None."""
    if node.op != "call_function" or node.target not in (*_CONVS, _LINEAR) or len(node.args) < 3:
        return None
    bias = node.args[2]
    if isinstance(bias, torch.fx.Node) and bias.op == "call_module":
        if getattr(module.get_submodule(bias.target), "dtype", None) not in (torch.int32, torch.qint32):
            return None
        bias = bias.args[0]
    return bias.target if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" else None


def _on_tokens(module: Any, node: Any) -> bool:
    """Whether a linear runs on a token (or NHWC) tensor: its output has rank 3 or more (or no recorded value), or it
    runs on that tensor's rows and its output, through its observer, is reshaped back to rank 3 or more
    (rewrites.flatten_linears)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() > 2:
        return True
    users = list(node.users)
    while users:
        user = users.pop()
        if user.op == "call_module" and isinstance(module.get_submodule(user.target), ObserverBase):
            users.extend(user.users)
        elif user.op == "call_function" and user.target in _RESHAPES:
            val = user.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() > 2:
                return True
    return False


def _channel_dims(node: Any, out: torch.Tensor) -> list[int]:
    """The dims a layer's output is averaged over for one mean per channel (a corrected linear's is 2-D)."""
    return [0] if node.target is _LINEAR else [0, *range(2, out.dim())]


class _Means(torch.fx.Interpreter):
    """Runs the graph, recording each corrected layer's per-channel output mean (float64)."""

    def __init__(self, module: Any, layers: dict[Any, str]) -> None:
        super().__init__(module)
        self.layers, self.means = layers, {}

    def run_node(self, n: Any) -> Any:
        out = super().run_node(n)
        if n in self.layers:
            self.means[n] = out.double().mean(_channel_dims(n, out))
        return out


class _Correcting(torch.fx.Interpreter):
    """Runs the graph, taking each layer's mean shift from its bias and from its output as it goes."""

    def __init__(self, module: Any, layers: dict[Any, str], float_means: dict[Any, torch.Tensor]) -> None:
        super().__init__(module)
        self.layers, self.float_means, self.corrected = layers, float_means, []

    def run_node(self, n: Any) -> Any:
        out = super().run_node(n)
        reference = self.float_means.get(n)
        if reference is None:
            return out
        shift = out.double().mean(_channel_dims(n, out)) - reference
        if not bool(torch.isfinite(shift).all()):
            return out
        bias = functools.reduce(getattr, self.layers[n].split("."), self.module)
        bias.data -= shift.to(bias.dtype)
        self.corrected.append(self.layers[n])
        shape = [1] * out.dim()
        shape[-1 if n.target is _LINEAR else 1] = -1
        return out - shift.to(out.dtype).reshape(shape)


class Correction:
    """Bias correction of a module being calibrated: `observe` is one calibration forward (its observers see the
    batch as any other) that also records the float output means of the layers to correct; `apply`, after the
    last batch, corrects those layers' biases on that batch. One float pass serves both."""

    def __init__(self, module: Any) -> None:
        layers = {n: name for n in module.graph.nodes if (name := _bias_name(module, n)) is not None}
        readers = collections.Counter(layers.values())  # a shared bias serves two: neither is corrected
        self.module, self.args, self.float_means = module, (), {}
        self.layers = {
            n: name
            for n, name in layers.items()
            if readers[name] == 1 and not (n.target is _LINEAR and _on_tokens(module, n))
        }

    def observe(self, *args: Any) -> Any:
        means = _Means(self.module, self.layers)
        out = means.run(*args)
        self.args, self.float_means = args, means.means
        return out

    def apply(self, make: Any = None) -> list[str]:
        """Correct the biases (the module's parameters, in place), each observer quantizing as `make(observer)` makes
        it (default: fake_quant, as the convert will); the names of those corrected, in graph order."""
        if not self.float_means:
            return []
        with torch.no_grad(), observers_replaced(self.module, make or fake_quant):
            correcting = _Correcting(self.module, self.layers, self.float_means)
            correcting.run(*self.args)
        return correcting.corrected


def correct(module: Any, args: tuple) -> list[str]:
    """Correct the biases of the calibrated `module` on the batch `args` (observed already: its observers only pass
    it through here); the names of the biases corrected, in graph order."""
    correction = Correction(module)
    with torch.no_grad(), observers_replaced(module, lambda obs: torch.nn.Identity()):
        correction.observe(*args)
    return correction.apply()
