"""The one place that imports torch/torchao and calls their churning APIs.

torch and torchao print noise at import (torchao failing to load CUDA/cp310 kernels, pytree Enum
deprecations, exporter registration messages). It is silenced here, precisely, by logger name and
warning category, so that users see only quantcli's own output.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

_NOISY_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "torch.onnx._internal.exporter._registration",
    "torch.onnx._internal.exporter._core",
    "torch._export",
    "torch.export",
    "onnxscript",
)


def _silence() -> None:
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*treespec.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._export.*")
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")


_silence()

import torch  # noqa: E402
import torchao  # noqa: E402,F401  (registers quantized_decomposed ops used by saved programs)
from torchao.quantization.pt2e import (  # noqa: E402
    allow_exported_model_train_eval,
    move_exported_model_to_eval,
    move_exported_model_to_train,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e  # noqa: E402

torch.set_num_threads(max(1, torch.get_num_threads()))

__all__ = [
    "torch",
    "export",
    "save_program",
    "load_program",
    "prepare",
    "convert",
    "to_train",
    "to_eval",
    "allow_exported_model_train_eval",
]


def export(module: Any, args: tuple, dynamic_shapes: Any) -> Any:
    """torch.export.export, non-strict (keeps nn_module_stack), with the recipe's dynamic axes."""
    return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)


def save_program(program: Any, path: Path) -> None:
    """torch.export.save, made reproducible: the same program gives the same bytes in every process.

    Node provenance (`meta["from_node"]`, written by passes such as convert_pt2e) records `id()` of
    graphs, a memory address that differs on every run; it is dropped before saving.
    """
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if isinstance(graph, torch.fx.Graph) else ():
            node.meta.pop("from_node", None)
    torch.export.save(program, str(path))


def load_program(path: Path) -> Any:
    return torch.export.load(str(path))


def prepare(module: Any, quantizer: Any, qat: bool) -> Any:
    return (prepare_qat_pt2e if qat else prepare_pt2e)(module, quantizer)


def convert(module: Any, fold_quantize: bool, reference_representation: bool = False) -> Any:
    return convert_pt2e(module, use_reference_representation=reference_representation, fold_quantize=fold_quantize)


def prune_unused(module: Any) -> Any:
    """Drop parameters and buffers no get_attr node reads (convert leaves the fp32 weights behind)."""
    used = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
        if name not in used and not any(u.startswith(name + ".") for u in used):
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            delattr(owner, attr)
    module.graph.lint()
    module.recompile()
    return module


def to_train(module: Any) -> Any:
    return move_exported_model_to_train(module)


def to_eval(module: Any) -> Any:
    return move_exported_model_to_eval(module)
