"""The weight-only methods by name (quantcli.quantizers.names.WEIGHT_METHODS): weight, grid, statistics -> result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from quantcli.errors import DataError
from quantcli.weightonly.awq import awq
from quantcli.weightonly.collect import InputStats
from quantcli.weightonly.gptq import gptq
from quantcli.weightonly.grid import Grid
from quantcli.weightonly.result import Quantized
from quantcli.weightonly.rtn import rtn

# name -> (weight [N, K], grid, the input statistics or None) -> (result, what the method chose, for the manifest)
Method = Callable[[torch.Tensor, Grid, InputStats | None], tuple[Quantized, dict[str, Any]]]


def _rtn(w: torch.Tensor, grid: Grid, stats: InputStats | None) -> tuple[Quantized, dict[str, Any]]:
    return rtn(w, grid), {}


def _gptq(w: torch.Tensor, grid: Grid, stats: InputStats | None) -> tuple[Quantized, dict[str, Any]]:
    return gptq(w, _collected(stats).hessian, grid), {}


def _awq(w: torch.Tensor, grid: Grid, stats: InputStats | None) -> tuple[Quantized, dict[str, Any]]:
    result, alpha = awq(w, _collected(stats).hessian, stats.magnitude(), grid)
    return result, {"alpha": alpha}


def _collected(stats: InputStats | None) -> InputStats:
    if stats is None or int(stats.rows) == 0:
        raise DataError("weight-only: a linear's input saw no calibration data; run `quantcli calibrate` with data")
    return stats


METHODS: dict[str, Method] = {"rtn": _rtn, "gptq": _gptq, "awq": _awq}
