"""export's options: opsets above and below the exporter's 18, reference representation, errors."""

from __future__ import annotations

import onnx
import pytest

from quantcli import stages
from quantcli.errors import ModelError, RecipeError
from quantcli.onnx import export as onnx_export
from tests.recipes import write_recipe


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlp")
    w = folder / "w"
    stages.capture.run(write_recipe(folder, "mlp"), w / "captured")
    stages.prepare.run(w / "captured", w / "prepared")
    stages.calibrate.run(w / "prepared", w / "calibrated")
    stages.convert.run(w / "calibrated", w / "converted")
    return w


@pytest.mark.parametrize("opset", [17, 20])
def test_other_opsets_are_written_and_checked(mlp, tmp_path, opset):
    result = stages.export.run(mlp / "converted", tmp_path / "model.onnx", opset=opset)
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert onnx_export.opset_of(model) == opset
    assert result.details["report"]["parity"]["passed"]
    onnx.checker.check_model(model, full_check=True)


def test_an_opset_the_converter_cannot_reach_is_an_error_and_writes_nothing(mlp, tmp_path):
    with pytest.raises(RecipeError, match=r"export.opset 13: the model cannot be converted from opset 18.*Relu"):
        stages.export.run(mlp / "converted", tmp_path / "model.onnx", opset=13)
    assert list(tmp_path.iterdir()) == []


def test_reference_representation_converts_and_exports(mlp, tmp_path):
    stages.convert.run(mlp / "calibrated", tmp_path / "converted", reference_representation=True)
    report = stages.export.run(tmp_path / "converted", tmp_path / "model.onnx").details["report"]
    assert report["parity"]["passed"]
    ops = report["onnx"]["ops"]
    assert ops.get("Cast", 0) > 0  # the rewrite's integer arithmetic, absent from the QDQ graph


def test_an_out_dtype_graph_names_the_option_to_drop():
    import torch
    from torch._higher_order_ops.out_dtype import out_dtype

    class IntegerMatmul(torch.nn.Module):
        def forward(self, a):
            return out_dtype(torch.ops.aten.mm.default, torch.int32, a, torch.ones(4, 3, dtype=torch.int8)).float()

    program = torch.export.export(IntegerMatmul(), (torch.ones(2, 4, dtype=torch.int8),), strict=False)
    with pytest.raises(ModelError) as info:
        onnx_export.to_onnx(program, opset=18, input_names=["a"], output_names=["y"])
    assert "convert without --reference-representation" in info.value.line()
