"""The CLI contract as a CI shell script uses it, and every architecture of tests/models.py through it.

The digits chain is the session's shared run of scripts/ci-example.sh (conftest `ci_run`): each
stage a separate process. Every architecture of tests/models.py runs capture -> prepare ->
calibrate -> convert -> export through the CLI's code in-process (conftest `chained`, once per
session; each stage still reads the previous one's artifact from disk), and its ONNX is checked
against fp32, against the converted module in ONNX Runtime, and for ORT's integer kernels.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from quantcli import artifacts
from quantcli.onnx import runtime
from quantcli.onnx.export import ORIGIN_KEY, origin
from tests.conftest import cli
from tests.models import MODELS, example_batch
from tests.tolerances import CHAIN_SQNR_DB

STAGE_FILES = {
    "captured": {"program.pt2"},
    "prepared": {"program.pt2", "state.pt"},
    "calibrated": {"program.pt2", "state.pt"},
    "converted": {"program.pt2", "float.pt2", "state.pt"},
}


def test_digits_chain_writes_exactly_each_stage(ci_run, work):
    assert sorted(p.name for p in work.iterdir()) == [
        "calibrated",
        "captured",
        "converted",
        "export.json",
        "model.onnx",
        "model.report.json",
        "prepared",
    ]
    for name, files in STAGE_FILES.items():
        assert {p.name for p in (work / name).iterdir()} == files | {"manifest.json", "timings.json"}
        manifest = json.loads((work / name / "manifest.json").read_text())
        assert manifest["stage"] == name and set(manifest["files"]) == files
    for out in ["captured", "prepared", "calibrated", "converted", "model.onnx"]:
        assert f"wrote {work / out} in " in ci_run.stderr


def test_digits_int8_onnx_keeps_fp32_accuracy(work):
    report = json.loads((work / "model.report.json").read_text())
    ev = report["evaluation"]
    assert ev["samples"] == 400 and ev["fp32_torch"] >= 0.97
    assert ev["int8_onnx"] >= ev["fp32_torch"] - 0.003  # within 0.3 points, ORT optimizations on
    # the evaluator's vocabulary (docs/keys.md): drop in the metric's units, each model's SQNR against fp32
    assert ev["drop"] == round(ev["fp32_torch"] - ev["int8_onnx"], 6) and "accuracy_drop_points" not in ev
    assert set(ev["sqnr_db"]) == {"fp32_onnx", "int8_onnx"} and ev["sqnr_db"]["fp32_onnx"] > ev["sqnr_db"]["int8_onnx"]
    assert report["parity"]["passed"]
    # int8 weights, and no exporter debug metadata (stack traces held 60 % of the bytes)
    assert ev["size_bytes"]["int8_onnx"] < 0.45 * ev["size_bytes"]["fp32_onnx"]


def test_digits_onnx_carries_manifest_and_shapes(work):
    model = onnx.load(str(work / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["quantcli.stage"]) == "exported" and json.loads(meta["quantcli.status"]) == "ok"
    assert model.opset_import[0].version == 21
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    produced = {o for n in model.graph.node for o in n.output} - {"logits"}
    assert produced <= {v.name for v in model.graph.value_info}
    assert not (work / "model.onnx.data").exists()  # one self-contained file
    # of the exporter's debug metadata only the origin (module, its class, torch op) of a node computing floats
    assert {p.key for node in model.graph.node for p in node.metadata_props} == {ORIGIN_KEY}
    origins = {node.name: origin(node) for node in model.graph.node}
    assert {o["module"] for o in origins.values()} >= {"features.0.0", "features.4.conv1", "fc"}
    assert {o["module_type"] for o in origins.values()} >= {"Conv2d", "Linear"}
    assert not any("/" in value for o in origins.values() for value in o.values())  # no paths
    floats = {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    for node in model.graph.node:  # integer arithmetic (shapes, moves of quantized tensors) carries none
        computes_float = any(out in floats or out == "logits" for out in node.output)
        assert computes_float or not node.metadata_props, node


def test_inspect_json_of_each_stage(work):
    """In this process: the stages above were each written and read by a process of their own."""
    for name, stage in [("captured", "captured"), ("converted", "converted"), ("model.onnx", "exported")]:
        result = cli("inspect", work / name, "--json")
        assert result.rc == 0, result.stderr
        assert result.json()["manifest"]["stage"] == stage


# (Conv/MatMul/Gemm that ORT runs as integer kernels after its optimizations; those left float).
# ORT's CPU provider has no integer ConvTranspose. scaled_dot_product_attention (vit, hf_bert) is
# written out before annotation, so its QK^T and attention x V matmuls are integer kernels too (2 per
# layer). The SQNR floors depend on the target: tests/tolerances.py.
EXPECTED = {
    "resnet": (11, {}),
    "mobilenet_v2": (15, {}),
    "mobilenet_v3": (25, {}),
    "unet": (11, {"ConvTranspose": 1}),
    "audio": (5, {}),
    "mlp": (3, {}),
    "vit": (18, {}),
    "bert": (17, {}),
    "gpt": (17, {}),
    "two_io": (5, {}),
    "hf_bert": (17, {}),
}


def test_expected_covers_every_model():
    assert set(EXPECTED) == set(MODELS) == set(CHAIN_SQNR_DB)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.slow
def test_architecture_chain(name, chained):
    integer, floating = EXPECTED[name]
    floor = CHAIN_SQNR_DB[name]
    w = chained(name)
    model = onnx.load(str(w / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    report = json.loads((w / "model.report.json").read_text())
    assert report["parity"]["passed"] and report["parity"]["min_sqnr_db"] >= 30
    assert report["u8s8"]["target_cpu"] == "avx2" and report["u8s8"]["saturable_pairs"] == 0, report["u8s8"]
    assert min(report["sqnr_vs_float_db"].values()) >= floor, report["sqnr_vs_float_db"]
    shapes = report["onnx"]["shapes"]
    assert shapes["with_shape"] == shapes["intermediate"] > 0
    assert report["onnx"]["int8_initializers"] > 0
    coverage = report["kernels"]["coverage"]  # export's own analysis of ORT's optimized graph
    assert coverage["integer"] == integer and coverage["float_ops"] == floating, coverage
    assert report["kernels"]["warning"] is None
    islands = report["kernels"]["islands"]  # only kinds ORT has no integer kernel for
    assert not [i for i in islands if not i["allowed"]], islands
    assert [i.name for i in model.graph.input] == [i["name"] for i in MODELS[name][1]]
    # the batch axis stays symbolic, under the recipe's name, and another batch size runs
    assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in model.graph.input)
    batch = {k: v.numpy() for k, v in example_batch(name, batch=3, seed=7).items()}
    outputs = runtime.run(runtime.session(w / "model.onnx"), batch)
    assert all(o.shape[0] == 3 and np.isfinite(o).all() for o in outputs)
    # only floating-point values are observed: ids, masks, positions and shapes stay as captured
    from quantcli.stages.base import restore_prepared

    prepared = restore_prepared(artifacts.open_artifact(w / "calibrated", ("calibrated",), "test"))
    observed = [
        n.args[0].meta["val"].dtype
        for n in prepared.graph.nodes
        if n.op == "call_module" and n.target.startswith("activation_post_process_")
    ]
    assert observed and all(dtype.is_floating_point for dtype in observed)


@pytest.mark.parametrize("name", ["mobilenet_v3", "hf_bert"])
@pytest.mark.slow
def test_convert_saves_its_module_lifted_without_a_retrace_and_it_exports_as_the_retrace_does(name, chained, tmp_path):
    import copy

    from quantcli import _torch
    from quantcli.loading.data import to_tensors
    from quantcli.loading.inputs import dynamic_shapes, export_example
    from quantcli.onnx import export as onnx_export
    from quantcli.quantizers import pair_safety
    from quantcli.stages.base import recipe_of, restore_prepared

    converted = artifacts.open_artifact(chained(name) / "converted", ("converted",), "test")
    recipe = recipe_of(converted)
    module = _torch.convert(_torch.to_eval(restore_prepared(converted, artifacts.FLOAT_PROGRAM)), fold_quantize=True)
    pair_safety.enforce(module, recipe.quantization)
    _torch.prune_unused(module)  # the module convert made, again
    lifted = _torch.lifted(copy.deepcopy(module), _torch.load_program(converted.file(artifacts.FLOAT_PROGRAM)))
    args = to_tensors(export_example(recipe.inputs), recipe.inputs)
    traced = _torch.export_program(module, args, dynamic_shapes(recipe.inputs))
    saved = _torch.load_program(converted.file(artifacts.PROGRAM))  # the lift, not the re-trace (hf_bert's node names)
    assert [(n.op, n.name, n.target) for n in saved.graph.nodes] == [
        (n.op, n.name, n.target) for n in lifted.graph.nodes
    ]
    specs = [
        [(s.kind, s.arg.name, s.target, s.persistent) for s in p.graph_signature.input_specs] for p in (lifted, traced)
    ]
    assert specs[0] == specs[1]  # parameters, buffers (a non-persistent one as a constant), inputs: named alike
    assert lifted.state_dict.keys() == traced.state_dict.keys() and lifted.constants.keys() == traced.constants.keys()
    io = converted.manifest["io"]
    models = []
    for program, path in ((lifted, tmp_path / "lifted.onnx"), (traced, tmp_path / "traced.onnx")):
        model = onnx_export.to_onnx(program, opset=21, input_names=io["inputs"], output_names=io["outputs"])
        onnx_export.tidy(model)
        onnx.save(model, str(path))
        models.append(model)
    if name == "mobilenet_v3":  # a CNN: the same file to the byte
        assert models[0].SerializeToString() == models[1].SerializeToString()
    batch = {k: v.numpy() for k, v in example_batch(name, batch=3, seed=7).items()}
    outputs = [runtime.run(runtime.session(tmp_path / f"{kind}.onnx"), batch) for kind in ("lifted", "traced")]
    assert all(np.array_equal(a, b) for a, b in zip(*outputs)) and len(outputs[0]) == len(io["outputs"])
