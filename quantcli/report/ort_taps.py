"""Per-layer values of an ONNX QDQ model in ONNX Runtime (full optimizations), read at Q tensors.

A graph output added at a float op's output stops ORT from fusing that op into an integer
kernel (the float tensor must exist), which would measure another model than the one shipped.
An output added at a QuantizeLinear's output does not: a fused QLinearConv/QGemm writes that
very uint8 tensor. So each layer is tapped at the QuantizeLinear that reads its output, and the
integers are dequantized here with that node's scale and zero point. The tapped model's integer
kernels are counted against the untapped one's (`fusions_kept`).

The exporter names an FX node's output value after the node, so the QuantizeLinear reading
value `linear_1` quantizes the output of FX node `linear_1`: the same key as the PyTorch taps.
The node that produces it carries its module (quantcli.onnx.export.origin), checked against the
module the PyTorch side found.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from quantcli.onnx import external, fusion, runtime
from quantcli.onnx.export import origin


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


class OrtTaps:
    """The ONNX model at `path` with a graph output at the Q tensor of each tapped FX node."""

    def __init__(self, path: Path, nodes: list[str], modules: dict[str, str]):
        import onnx

        model = onnx.load(str(path))
        graph = model.graph
        consts = _constants(graph)
        producer_module = {out: origin(n)["module"] for n in graph.node for out in n.output}
        wanted = set(nodes)
        self.taps: dict[str, tuple[str, float, int]] = {}  # FX node -> (Q output, scale, zero point)
        self.module_mismatch: list[str] = []
        outputs = {o.name for o in graph.output}
        for node in graph.node:
            if node.op_type != "QuantizeLinear" or node.input[0] not in wanted or node.input[0] in self.taps:
                continue
            name = node.input[0]
            scale = consts.get(node.input[1])
            zero = consts.get(node.input[2]) if len(node.input) > 2 else np.zeros((), np.uint8)
            if scale is None or zero is None or scale.size != 1:
                continue
            self.taps[name] = (node.output[0], float(scale), int(zero))
            if producer_module.get(name, "") not in ("", modules.get(name, "")):
                self.module_mismatch.append(name)
            if node.output[0] not in outputs:
                dtype = onnx.TensorProto.INT8 if zero.dtype == np.int8 else onnx.TensorProto.UINT8
                graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], dtype, None))
        self.outputs = len(model.graph.output) - len(self.taps)
        self._tmp = tempfile.TemporaryDirectory(prefix="quantcli-taps-")
        tapped = Path(self._tmp.name) / "tapped.onnx"
        external.save(model, tapped)  # a large model's tensors beside it, as in the file it taps
        self.session = runtime.session(tapped)
        self.fusions_kept = _integer_kernels(tapped) == _integer_kernels(path)
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, batch: dict[str, np.ndarray]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """(the model's outputs, FX node -> its dequantized output) on one batch."""
        values = dict(zip(self.names, runtime.run(self.session, batch)))
        outs = [values[name] for name in self.names[: self.outputs]]
        taps = {
            node: (values[q].astype(np.float32) - zero) * np.float32(scale)
            for node, (q, scale, zero) in self.taps.items()
        }
        return outs, taps

    def close(self) -> None:
        self.session = None
        self._tmp.cleanup()


def _integer_kernels(path: Path) -> dict[str, int]:
    return fusion.integer_op_report(path)["integer_ops"]
