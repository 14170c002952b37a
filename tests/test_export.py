"""export's options: opsets other than the default 21 (18 and below), reference representation, errors."""

from __future__ import annotations

import contextlib
import json
import operator as _operator
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from quantcli import stages
from quantcli.errors import ModelError, RecipeError
from quantcli.onnx import export as onnx_export
from quantcli.onnx import external
from tests.conftest import cli, run_chain
from tests.recipes import write_recipe


@pytest.fixture
def mlp(chained):
    """The session's mlp chain (conftest `chained`): read only, new files go to tmp_path."""
    return chained("mlp")


@pytest.mark.parametrize("opset", [17, 18])
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


@pytest.mark.slow
def test_reference_representation_converts_and_exports(mlp, tmp_path, patterns_as_torchao_traces):
    stages.convert.run(mlp / "calibrated", tmp_path / "converted", reference_representation=True)
    assert patterns_as_torchao_traces  # the rewrite's patterns, each traced as torchao traces it too
    report = stages.export.run(tmp_path / "converted", tmp_path / "model.onnx").details["report"]
    assert report["parity"]["passed"]
    ops = report["onnx"]["ops"]
    plain = sum(n.op_type == "Cast" for n in onnx.load(str(mlp / "model.onnx")).graph.node)  # its narrow biases
    assert ops.get("Cast", 0) > plain  # the rewrite's integer arithmetic, absent from the QDQ graph


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


def test_the_report_gives_integer_kernel_coverage_and_warns_under_half(mlp, tmp_path):
    report = json.loads((mlp / "model.report.json").read_text())
    assert report["kernels"]["coverage"]["integer"] == report["kernels"]["coverage"]["total"] == 3
    assert report["kernels"]["warning"] is None
    # two of the three Linear layers kept in float: 1 of 3 in integer, said on stderr and in the report
    recipe = write_recipe(tmp_path, "mlp", quantization={"exclude_names": ["fc1", "fc2"]})
    w = tmp_path / "w"
    run = run_chain(recipe, w)[-1]
    assert "warning: only 1 of 3 convs/matmuls run as integer kernels in ONNX Runtime" in run.stderr
    kernels = json.loads((w / "model.report.json").read_text())["kernels"]
    assert kernels["coverage"] == {**kernels["coverage"], "integer": 1, "total": 3}
    assert kernels["warning"].startswith("only 1 of 3")
    inspected = cli("inspect", w / "model.onnx")
    assert "integer kernels in ONNX Runtime: 1 of 3 convs/matmuls" in inspected.stdout
    assert "warning: only 1 of 3" in inspected.stdout


def test_a_model_over_the_size_limit_keeps_its_tensors_in_one_data_file_beside_it(mlp, tmp_path):
    """The limit (2 GiB less the graph's room by default) at 0 bytes: the mlp's tensors go to model.onnx.data;
    parity, fusion analysis, the report's taps, inspect and reuse read it there."""
    from quantcli.artifacts import data_path

    out = tmp_path / "model.onnx"
    report = stages.export.run(mlp / "converted", out, external_above=0).details["report"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data", "model.report.json"]
    assert report["parity"]["passed"] and report["kernels"]["coverage"]["integer"] > 0
    assert report["onnx"]["external_data"] and report["data"] == "model.onnx.data"
    assert report["onnx"]["size_bytes"] > data_path(out).stat().st_size  # both files counted
    assert data_path(out).stat().st_mode == out.stat().st_mode  # readable by whoever can read the model
    proto = onnx.load(str(out), load_external_data=False)
    external_data = [t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer]
    assert any(external_data)  # the weights; constants under INLINE_BYTES stay in the model for shape inference
    assert all(e or len(t.raw_data) < external.INLINE_BYTES for e, t in zip(external_data, proto.graph.initializer))
    assert onnx_export.read_metadata(out)["stage"] == "exported"  # the manifest went into the model, not the data

    layers = cli("report", mlp / "converted", "--onnx", out, "--json")
    assert layers.rc == 0, layers.stderr
    assert json.loads(layers.stdout)["layers"]  # per-layer figures from ORT taps of the model with external data
    inspected = cli("inspect", out, "--json")
    assert inspected.rc == 0 and json.loads(inspected.stdout)["report"]["parity"]["passed"]

    assert stages.export.run(mlp / "converted", out, external_above=0).reused
    data_path(out).write_bytes(data_path(out).read_bytes()[:-4] + b"\0\0\0\0")  # a torn or altered data file
    assert not stages.export.run(mlp / "converted", out, external_above=0).reused
    stages.export.run(mlp / "converted", out, force=True)  # under the limit again: one file, no stale data beside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.report.json"]


class _Flatten(torch.nn.Module):
    """Ops that all have ONNX functions (conv, relu, flatten, linear); with `mask`, also the `&`, `1.0 - mask`
    and `Tensor.to` of transformers' attention masks, which the re-trace renames; with `norm`, an inference
    BatchNorm and a global average pool, which it writes as another op each; with `pool`, an adaptive pool
    to 2 x 2, which it lowers; with `drop`, torchvision's classifier dropout (in place), which it removes; with
    `tail`, an inference dropout (or a cast to the output's own dtype) that is the program's output."""

    def __init__(self, mask: bool = False, pool: bool = False, norm: bool = False, drop: bool = False, tail: str = ""):
        super().__init__()
        self.tail = tail
        self.drop = torch.nn.Dropout(0.2, inplace=True) if drop else torch.nn.Identity()
        side = 1 if norm else 2 if pool else 6
        self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4 * side * side, 5)
        self.pool = torch.nn.AdaptiveAvgPool2d(side) if pool or norm else torch.nn.Identity()
        self.norm = torch.nn.BatchNorm2d(4) if norm else torch.nn.Identity()
        if norm:
            self.norm.running_mean.uniform_(-0.5, 0.5), self.norm.running_var.uniform_(0.5, 2)
        self.mask = mask

    def forward(self, x):
        y = self.fc(self.drop(self.pool(torch.relu(self.norm(self.conv(x)))).flatten(1)))
        if self.tail:
            return torch.nn.functional.dropout(y, 0.1, False) if self.tail == "drop" else y.to(torch.float32)
        return (1.0 - ((y > 0) & (y < 1)).to(y.dtype)) * y.to(torch.float32) if self.mask else y


def _exported_ops(model: torch.nn.Module) -> tuple[np.ndarray, str]:
    """The ONNX model's output on a fixed input, and the exporter's record of the torch ops it translated."""
    from quantcli import _torch

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ops, session = _translated(_torch.export_program(model.eval(), (x,), None))
    return session.run(None, {"x": x.numpy()})[0], ops


def _translated(program: Any) -> tuple[str, Any]:
    """The exporter's record of the torch ops it translated in `program`, and an ORT session of the ONNX model."""
    import onnxruntime as ort

    onnx_model = onnx_export.to_onnx(program, opset=21, input_names=["x"], output_names=["y"])
    ops = " ".join(p.value for n in onnx_model.graph.node for p in n.metadata_props if p.key == "namespace")
    return ops, ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("variant", ["plain", "mask", "norm", "drop", "tail_drop", "tail_cast"])
def test_a_program_of_onnx_functions_skips_the_exporters_retrace_with_the_same_outputs(monkeypatch, variant):
    """With `tail_*` the node written as nothing is the program's output, which the signature names: it stays,
    as a copy (EVA-02 in the sweep had failed to export)."""
    from quantcli._torch import exporter

    torch.manual_seed(0)
    tail = variant.removeprefix("tail_") if variant.startswith("tail_") else ""
    model = _Flatten(mask=variant == "mask", norm=variant == "norm", drop=variant == "drop", tail=tail)
    direct, direct_ops = _exported_ops(model)
    monkeypatch.setattr(exporter, "_decompositions_only_where_needed", contextlib.nullcontext)
    retraced, retraced_ops = _exported_ops(model)
    assert "aten.flatten.using_ints" in direct_ops and "aten.view.default" not in direct_ops  # translated as it is
    assert "aten.view.default" in retraced_ops and "aten.flatten" not in retraced_ops  # the re-trace lowers it
    for ops in (direct_ops, retraced_ops):  # the ops written as the re-trace writes them
        if variant == "mask":
            assert "aten.bitwise_and.Tensor" in ops and "aten._to_copy.default" in ops and "aten.to." not in ops
            assert "aten.sub.Tensor" in ops and "aten.rsub" not in ops
        if variant == "norm":
            assert "aten._native_batch_norm_legit_no_training.default" in ops and "aten.mean.dim" in ops
            assert "aten.batch_norm.default" not in ops and "aten.adaptive" not in ops
        assert "dropout" not in ops
    np.testing.assert_array_equal(direct, retraced)


class _Casts(torch.nn.Module):
    """With `cast`, an int scalar divides a float tensor and an int mask is added to it: the exporter's type
    promotion casts both."""

    def __init__(self, cast: bool):
        super().__init__()
        self.conv, self.cast = torch.nn.Conv2d(3, 4, 3), cast

    def forward(self, x):
        y = torch.relu(self.conv(x)) * 0.5 + 1.0
        return y / 3 + (y > 1).long() if self.cast else y


@pytest.mark.parametrize("cast", [False, True])
def test_type_promotion_runs_only_on_a_graph_it_changes_and_the_onnx_is_the_same(monkeypatch, cast):
    from torch.onnx._internal.fx.passes import type_promotion

    from quantcli import _torch
    from quantcli._torch import exporter

    runs = []
    full_pass = type_promotion.InsertTypePromotion.run
    monkeypatch.setattr(type_promotion.InsertTypePromotion, "run", lambda self: runs.append(1) or full_pass(self))
    program = _torch.export_program(_Casts(cast).eval(), (torch.randn(2, 3, 8, 8),), None)
    direct = onnx_export.to_onnx(program, opset=21, input_names=["x"], output_names=["y"])
    assert len(runs) == cast
    monkeypatch.setattr(exporter, "_type_promotion_only_where_needed", contextlib.nullcontext)
    always = onnx_export.to_onnx(program, opset=21, input_names=["x"], output_names=["y"])
    assert len(runs) == 1 + cast  # without the check the pass runs on every graph
    assert direct.SerializeToString() == always.SerializeToString()
    if cast:
        assert {"Cast", "Div"} <= {n.op_type for n in direct.graph.node}


def test_the_program_exported_stays_as_it_was():
    """The rewrites are made in a copy: the caller's program (which prepare may read next) keeps its ops."""
    from quantcli import _torch

    model = _Flatten(mask=True, norm=True).eval()
    program = _torch.export_program(model, (torch.randn(2, 3, 8, 8),), None)
    before = [(n.name, n.target, n.args) for n in program.graph.nodes]
    onnx_export.to_onnx(program, opset=21, input_names=["x"], output_names=["y"])
    assert [(n.name, n.target, n.args) for n in program.graph.nodes] == before
    assert torch.ops.aten.batch_norm.default in [n.target for n in program.graph.nodes]


class _Regrouped(torch.nn.Module):
    """A reshape to a size computed from the dynamic batch (`operator.mul` of a symbolic size in the program)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.relu(self.conv(x)).reshape(x.shape[0] * 2, -1)


def test_arithmetic_on_a_dynamic_size_is_translated_without_the_retrace_and_gives_its_outputs(monkeypatch):
    from quantcli import _torch
    from quantcli._torch import exporter

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = _torch.export_program(_Regrouped().eval(), (torch.randn(2, 3, 8, 8),), ({0: batch},))
    assert _operator.mul in [n.target for n in program.graph.nodes]

    direct_ops, direct = _translated(program)
    monkeypatch.setattr(exporter, "_decompositions_only_where_needed", contextlib.nullcontext)
    retraced_ops, retraced = _translated(program)
    assert "aten.reshape.default" in direct_ops and "aten.view" not in direct_ops  # translated as it is
    assert "aten.view.default" in retraced_ops  # the re-trace lowers the reshape
    for n in (1, 3):
        x = torch.randn(n, 3, 8, 8).numpy()
        y = direct.run(None, {"x": x})[0]
        assert y.shape == (2 * n, 72)
        np.testing.assert_array_equal(y, retraced.run(None, {"x": x})[0])


def test_a_program_with_an_op_onnx_lacks_is_still_retraced():
    torch.manual_seed(0)
    out, ops = _exported_ops(_Flatten(mask=True, pool=True))
    assert "aten.adaptive_avg_pool2d" not in ops and "aten.view.default" in ops  # lowered, the whole graph re-traced
    assert out.shape == (2, 5)


class _RotateHalf(torch.nn.Module):
    """Rotary embeddings' rotate_half: the halves of the last axis, swapped, one negated."""

    def forward(self, x):
        return torch.cat((-x[..., 4:8], x[..., 0:4]), dim=-1)


def test_the_exporters_optimizer_runs_without_its_quadratic_rule_and_gets_it_back(monkeypatch):
    """SlicesSplit (each node matched against every node of the graph) is left out of the exporter's optimizer for
    the export alone; every other rule runs, the halves are two Slices with the right values, and onnxscript's
    rules are as they were after."""
    import onnxruntime as ort
    import onnxscript.optimizer
    import onnxscript.rewriter

    from quantcli import _torch

    rules = onnxscript.rewriter._DEFAULT_REWRITE_RULES
    seen: list[set[str]] = []
    optimize = onnxscript.optimizer.optimize_ir

    def spy(model, *args, **kwargs):
        seen.append({r.name for r in onnxscript.rewriter._DEFAULT_REWRITE_RULES})
        return optimize(model, *args, **kwargs)

    monkeypatch.setattr(onnxscript.optimizer, "optimize_ir", spy)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    program = _torch.export_program(_RotateHalf().eval(), (x,), None)
    model = onnx_export.to_onnx(program, opset=21, input_names=["x"], output_names=["y"])
    assert seen == [{r.name for r in rules} - {"SlicesSplit"}] and "SlicesSplit" in {r.name for r in rules}
    assert onnxscript.rewriter._DEFAULT_REWRITE_RULES is rules
    assert [n.op_type for n in model.graph.node].count("Slice") == 2
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x.numpy()})[0], _RotateHalf()(x).numpy())


def test_the_exporters_table_is_torchs_entry_for_entry_with_signatures_inferred_when_an_op_is_looked_up():
    """quantcli's table of ATen -> ONNX functions holds what torch's `from_torchlib` builds: the same ops in the same
    order, each with the same functions and flags. None of torchlib's signatures is inferred when it is built; a
    lookup infers its op's, the one torch infers up front, and hands it to the function as torch does."""
    from torch.onnx._internal.exporter import _registration

    from quantcli._torch import exporter

    ours, theirs = exporter._onnx_registry.__wrapped__(21), _registration.ONNXRegistry.from_torchlib(opset_version=21)
    assert list(ours.functions) == list(theirs.functions) and len(theirs.functions) > 400
    fields = ("onnx_function", "fx_target", "is_custom", "is_complex", "opset_introduced", "device")
    for name, decomps in theirs.functions.items():
        assert [[getattr(d, f) for f in fields] for d in ours.functions[name]] == [
            [getattr(d, f) for f in fields] for d in decomps
        ], name
    deferred = [d for ds in ours.functions.values() for d in ds if isinstance(d, exporter._DeferredDecomp)]
    assert len(deferred) > 400 and all(d.pending and d.signature is None for d in deferred)
    conv = torch.ops.aten.convolution.default
    for a, b in zip(ours.get_decomps(conv), theirs.get_decomps(conv), strict=True):
        assert a.signature is not None and str(a.signature) == str(b.signature)
        assert a.onnx_function._pt_onnx_signature is a.signature  # what the exporter's builder reads
    for name, decomps in theirs.functions.items():
        assert [str(d.signature) for d in ours.get_decomps(decomps[0].fx_target)] == [
            str(d.signature) for d in theirs.get_decomps(decomps[0].fx_target)
        ], name


def test_tidy_keeps_one_initializer_per_constant_and_shapes_of_computed_tensors_only():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    table = np.arange(6, dtype=np.float32).reshape(2, 3)  # a table torch.export lifted once for each block
    initializers = [numpy_helper.from_array(table, name) for name in ("block0.table", "block1.table")]
    initializers.append(numpy_helper.from_array(table + 1, "other"))
    nodes = [
        helper.make_node("Add", ["x", "block0.table"], ["a"]),
        helper.make_node("Mul", ["a", "block1.table"], ["b"]),
        helper.make_node("Sub", ["b", "other"], ["y"]),
    ]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 3])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [value("x")], [value("y")], initializers, value_info=[value("a")])
    graph.value_info.extend([value("block0.table"), value("gone")])  # the exporter's entries for initializers
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = np.ones((2, 3), np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    onnx_export.tidy(model)

    assert [t.name for t in model.graph.initializer] == ["block0.table", "other"]
    assert [list(n.input) for n in model.graph.node][1] == ["a", "block0.table"]
    assert [v.name for v in model.graph.value_info] == ["a"]
    model = onnx_export.infer_shapes(model)
    assert onnx_export.shape_coverage(model) == {"intermediate": 2, "with_shape": 2}
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(before[0], after[0])


def test_constants_float16_holds_exactly_are_stored_as_float16(tmp_path):
    """Half the bytes, the same values: a Cast to float32 that ORT folds when it loads the model."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from quantcli.onnx.fusion import optimized_graph

    rng = np.random.default_rng(0)
    exact = rng.normal(0, 1, 512).astype(np.float16).astype(np.float32)
    inexact = rng.normal(0, 1, 512).astype(np.float32)
    nodes = [helper.make_node("Mul", ["x", "exact"], ["a"]), helper.make_node("Add", ["a", "inexact"], ["y"])]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 512])  # noqa: E731
    inits = [numpy_helper.from_array(exact, "exact"), numpy_helper.from_array(inexact, "inexact")]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [value("x")], [value("y")], inits), opset_imports=[helper.make_opsetid("", 21)]
    )
    x = {"x": rng.normal(0, 1, (2, 512)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    size = model.ByteSize()

    assert onnx_export.half_constants(model) == 1

    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert stored["exact_float16"].dtype == np.float16 and stored["inexact"].dtype == np.float32
    assert model.ByteSize() < size - 900  # 2 of its 4 bytes a value, less the Cast node
    onnx_export.check(onnx_export.infer_shapes(model))
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(after, before)
    onnx.save(model, str(tmp_path / "model.onnx"))
    assert "Cast" not in [n.op_type for n in optimized_graph(tmp_path / "model.onnx").node]


def test_the_evaluations_fp32_onnx_is_exported_once_a_process_for_one_float_program(work, shared_recipe, tmp_path):
    """`quantcli tune` exports each trial with the same float program: its fp32 ONNX, exported for the evaluation
    of the first, is the one later evaluations use; a float program in another file is exported anew."""
    import shutil

    from quantcli import _torch, artifacts, recipe
    from quantcli.report import evaluate

    source = work / "converted" / artifacts.FLOAT_PROGRAM
    copied = tmp_path / "copy.pt2"
    shutil.copy(source, copied)  # the same program in another file
    digits, program = recipe.load(shared_recipe), _torch.load_program(source)
    io = json.loads((work / "converted" / "manifest.json").read_text())["io"]
    exported = []
    to_onnx = onnx_export.to_onnx
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "_FLOAT_ONNX", {})
        patch.setattr(onnx_export, "to_onnx", lambda *a, **k: exported.append(1) or to_onnx(*a, **k))
        for index, file in enumerate((source, source, copied, source)):
            evaluate._float_onnx(digits, program, io, file, tmp_path / f"{index}.onnx")
    assert len(exported) == 2  # the source once, its copy once
    first = (tmp_path / "0.onnx").read_bytes()
    assert all((tmp_path / f"{index}.onnx").read_bytes() == first for index in range(1, 4))
    onnx.checker.check_model(onnx.load(str(tmp_path / "1.onnx")), full_check=True)


def test_the_lift_rebuilds_an_aten_graph_and_leaves_a_python_call_to_torch_export():
    from quantcli import _torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(5, 4)
    program = _torch.export_program(model, (x,), ({0: torch.export.Dim("batch")},))
    lifted = _torch.lifted(program.module(), program)
    assert [s.kind.name for s in lifted.graph_signature.input_specs] == ["PARAMETER", "PARAMETER", "USER_INPUT"]
    assert torch.equal(lifted.module()(x), model(x))
    module = program.module()
    relu = next(n for n in module.graph.nodes if n.target is torch.ops.aten.relu.default)
    relu.target = torch.relu  # a Python function, as a reference representation calls: torch.export traces it
    module.recompile()
    assert _torch.lifted(module, program) is None
