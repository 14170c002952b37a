"""Quantization-aware training: the loop behind `quantcli train`, its checkpoints, torch.distributed,
and a Python API for users who train in their own loop:

    from quantcli import training
    model = training.load("w/calibrated")     # a torch.nn.Module with safe .train()/.eval()
    ...                                       # your loop; model.freeze_bn(), model.freeze_observers()
    training.save(model, "w/trained")         # quantcli convert w/trained -o w/converted

Importing this package is cheap; `load`, `save` and `QatModule` import torch on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QatModule", "load", "save"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from quantcli.training import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
