"""A tiny model quantized both ways, in-process: quantcli's onnxruntime target and ORT's `quantize_static`.

`against_ort` exports the model's fp32 program with quantcli's exporter, quantizes it with ORT's
`quantize_static` as ORT's documentation recommends (QDQ, per-channel int8 weights, uint8
activations, MinMax, reduce_range where the target saturates) on the same calibration batches,
and quantcli's int8 model the way `quantcli export` writes it; `Side` reads each file as ORT
optimizes it (integer kernels, float islands, file size). Tests of a pattern assert that
quantcli's side is at least as good as ORT's on the same model, computed, not hard-coded.

Each side's output is what the target's CPU computes, on any machine (tests/tolerances.py): ORT's fused
kernels where this machine computes as the target does, which is always so for a pair-safe avx2 model;
for an 8-bit model (target vnni) on a machine whose u8 x s8 kernels saturate, ORT with its graph
optimizations off, whose DequantizeLinear, float op and QuantizeLinear give the products a VNNI machine
computes, unsaturated, requantized in float (within 0.04 dB of the fused kernels on a net where nothing
saturates: docs/cpu-targets.md). The optimized graph (kernels, float ops) is the same on every x86 machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from quantcli import _torch, quantizers
from quantcli.onnx import export as onnx_export
from quantcli.onnx import runtime
from quantcli.onnx.fusion import analyze
from quantcli.quantizers.cpu import detect_cpu, saturates_only_here, saturates_u8s8
from quantcli.recipe import DEFAULT_OPSET, QuantizationSection

torch = _torch.torch
HOST = detect_cpu()  # this machine's class: avx2, avx512, vnni or arm64


@dataclass
class Side:
    path: Path
    out: np.ndarray  # the first output on the test batch, ORT with every optimization on
    analysis: dict

    @property
    def integer(self) -> int:
        return self.analysis["coverage"]["integer"]

    @property
    def total(self) -> int:
        return self.analysis["coverage"]["total"]

    @property
    def float_ops(self) -> int:
        """Float ops on any float path from a DequantizeLinear to a QuantizeLinear in ORT's optimized graph,
        allowed kinds (LayerNorm...) and the ops beyond them included: each costs a float pass."""
        from quantcli.onnx.fusion import optimized_graph
        from quantcli.onnx.islands import island_nodes

        return len(island_nodes(optimized_graph(self.path)))

    @property
    def defects(self) -> list:
        return [i for i in self.analysis["islands"] if not i["allowed"]]

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class Pair:
    fp: np.ndarray  # the fp32 model's first output on the test batch
    quantcli: Side
    ort: Side
    converted: object  # quantcli's converted torch module


def _dynamic(batch: dict) -> tuple:
    return tuple({0: torch.export.Dim("batch")} for _ in batch)


def _side(path: Path, test: dict, target_cpu: str) -> Side:
    fused = not saturates_only_here(target_cpu, HOST)  # see the module docstring
    out = runtime.run(runtime.session(path, optimize=fused), {k: v.numpy() for k, v in test.items()})[0]
    return Side(path, out, analyze(path))


def quantcli_model(program, calib: list[dict], folder: Path, **q) -> tuple[Path, object]:
    """The pipeline's steps in-process from the captured `program`, exported as `quantcli export` writes the
    file (parity report aside)."""
    names = list(calib[0])
    section = quantizers.resolve(QuantizationSection(**q))
    args = tuple(calib[0].values())
    prepared = _torch.prepare(program.module(), quantizers.build(section), False)
    with torch.no_grad():
        for batch in calib:
            prepared(*batch.values())
    converted = _torch.convert(prepared, fold_quantize=True)
    _torch.prune_unused(converted)
    program = _torch.export_program(converted, args, _dynamic(calib[0]))
    proto = onnx_export.to_onnx(program, opset=DEFAULT_OPSET, input_names=names, output_names=["y"])
    onnx_export.tidy(proto)
    onnx_export.check(proto)
    proto = onnx_export.infer_shapes(proto)
    path = folder / "quantcli.onnx"
    onnx.save(proto, str(path))
    return path, converted


def ort_static_model(program, calib: list[dict], folder: Path, target_cpu: str) -> Path:
    """ORT's flow on quantcli's fp32 export of the captured `program`: quant_pre_process, then quantize_static
    (see the module docstring)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = list(calib[0])
    fp32, pre, out = folder / "fp32.onnx", folder / "fp32.pre.onnx", folder / "ort_static.onnx"
    onnx.save(onnx_export.to_onnx(program, opset=DEFAULT_OPSET, input_names=names, output_names=["y"]), str(fp32))
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calib)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {k: v.numpy() for k, v in batch.items()}

    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=saturates_u8s8(target_cpu),
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def against_ort(model, calib: list[dict], test: dict, folder: Path, target_cpu: str, **q) -> Pair:
    """`model` (eval mode) quantized by quantcli for `target_cpu` and by ORT's quantize_static, both run in ORT."""
    program = _torch.export_program(model, tuple(calib[0].values()), _dynamic(calib[0]))  # captured once for both
    theirs = ort_static_model(program, calib, folder, target_cpu)  # first: prepare below rewrites the module
    mine, converted = quantcli_model(program, calib, folder, target_cpu=target_cpu, **q)
    with torch.no_grad():
        fp = _torch.output_leaves(model(*test.values()))[0][1].numpy()
    return Pair(fp, _side(mine, test, target_cpu), _side(theirs, test, target_cpu), converted)
