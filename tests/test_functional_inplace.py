"""In-place ops in a captured program: rewritten to functional ones where no one can see the mutation."""

from __future__ import annotations

import torch
from torch import nn

from quantcli import _torch

aten = torch.ops.aten


class InPlace(nn.Module):
    """ReLU6(inplace=True) and `+=` on fresh values; a ReLU on a slice, which mutates the tensor it views;
    an in-place op on a value read again afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        y += 1.0
        head = y[:, :2]
        head.relu_()  # a view: y changes too
        z = self.conv(x) * 3.0
        kept = z.clone()
        torch.sigmoid_(kept)
        return y + z + kept


def targets(program) -> list:
    return [n.target for n in program.graph.nodes if n.op == "call_function"]


def test_inplace_ops_on_fresh_values_become_functional_and_outputs_stay_equal():
    torch.manual_seed(0)
    model = InPlace().eval()
    x = torch.randn(2, 3, 8, 8)
    program = _torch.export_program(model, (x,), ({0: torch.export.Dim("batch")},))
    found = targets(program)
    assert aten.hardtanh.default in found and aten.hardtanh_.default not in found
    assert aten.add.Tensor in found and aten.add_.Tensor not in found
    assert aten.relu_.default in found  # mutates a slice of y: kept
    assert aten.sigmoid.default in found  # clone's result, read by this op only
    with torch.no_grad():
        assert torch.equal(program.module()(x), model(x))
        other = torch.randn(5, 3, 8, 8)
        assert torch.equal(program.module()(other), model(other))
