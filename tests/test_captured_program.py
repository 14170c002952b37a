"""The captured program: in-place ops made functional where no one can see the mutation, unused state dropped
without a second trace."""

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


def test_unused_buffers_are_dropped_from_the_program_itself():
    """BatchNorm's num_batches_tracked is read by no node in eval mode: dropped from the program (its nodes are
    the captured ones: no second torch.export), with outputs unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    shapes = ({0: torch.export.Dim("batch")},)
    program = _torch.export_program(model, (x,), shapes)
    assert "1.num_batches_tracked" in program.state_dict
    nodes = set(program.graph.nodes)
    cleaned = _torch.without_dead_state(program, (x,), shapes)
    assert "1.num_batches_tracked" not in cleaned.state_dict and "1.running_var" in cleaned.state_dict
    assert set(cleaned.graph.nodes) <= nodes
    assert {s.target for s in cleaned.graph_signature.input_specs if s.target} == set(cleaned.state_dict)
    with torch.no_grad():
        assert torch.equal(cleaned.module()(x), model(x))
