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

# name -> (the weights [N, K] of the linears reading one input, their grids, that input's statistics or None) ->
# one (result, what the method chose, for the manifest) a weight. RTN and GPTQ quantize each linear alone; AWQ
# gets all its linears of one input together: they share one input scale (quantcli.weightonly.awq).
Method = Callable[[list[torch.Tensor], list[Grid], InputStats | None], list[tuple[Quantized, dict[str, Any]]]]


def _rtn(ws: list[torch.Tensor], grids: list[Grid], stats: InputStats | None) -> list[tuple[Quantized, dict]]:
    return [(rtn(w, grid), {}) for w, grid in zip(ws, grids)]


def _gptq(ws: list[torch.Tensor], grids: list[Grid], stats: InputStats | None) -> list[tuple[Quantized, dict]]:
    return [(gptq(w, _collected(stats).hessian, grid), {}) for w, grid in zip(ws, grids)]


def _awq(
    ws: list[torch.Tensor], grids: list[Grid], stats: InputStats | None, scale: bool = True
) -> list[tuple[Quantized, dict]]:
    results, alpha = awq(ws, _collected(stats).hessian, stats.magnitude(), grids, scale)
    return [(result, {"alpha": alpha}) for result in results]


def _collected(stats: InputStats | None) -> InputStats:
    if stats is None or int(stats.rows) == 0:
        raise DataError("weight-only: a linear's input saw no calibration data; run `quantcli calibrate` with data")
    return stats


METHODS: dict[str, Method] = {"rtn": _rtn, "gptq": _gptq, "awq": _awq}
SHARED_INPUT = {"awq"}  # the methods that quantize the linears reading one input together
