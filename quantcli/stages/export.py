"""export: converted program -> one self-contained ONNX QDQ file, checked, shape-inferred, parity-tested."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from quantcli import artifacts, recipe as recipes
from quantcli.errors import ArtifactError, NumericsError
from quantcli.loading.data import to_tensors
from quantcli.loading.inputs import example_batch
from quantcli.onnx import export as onnx_export
from quantcli.onnx import runtime
from quantcli.recipe import Recipe
from quantcli.report import parity
from quantcli.stages.base import StageResult, data_hashes, recipe_of


def report_path(out: Path) -> Path:
    return out.with_name(out.stem + ".report.json")


def read_report(out: Path) -> dict[str, Any] | None:
    """The quantcli report beside `out`, or None if there is none; a foreign file is refused."""
    path = report_path(out)
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        report = None
    if not isinstance(report, dict) or "onnx_sha256" not in report:
        raise ArtifactError(f"{path} exists and was not written by quantcli export",
                            "choose another output name; it is never replaced")
    return report


def verify_reused(out: Path) -> None:
    """A reused model must still be the file its report describes (sha256)."""
    report = read_report(out)
    if report is None or report["onnx_sha256"] != artifacts.sha256_file(out):
        raise ArtifactError(f"{out} does not match its report {report_path(out).name} (corrupt or replaced)",
                            "pass --force to export it again")


def outputs(program: Any, recipe: Recipe, sample: dict[str, Any]) -> list[Any]:
    """The flattened outputs of `program` run in PyTorch on `sample`, as numpy arrays."""
    import torch

    with torch.no_grad():
        result = program.module()(*to_tensors(sample, recipe.inputs))
    return [t.numpy() for t in torch.utils._pytree.tree_flatten(result)[0]]


def build_model(parent: artifacts.Artifact, recipe: Recipe, opset: int) -> Any:
    from quantcli import _torch

    program = _torch.load_program(parent.file(artifacts.PROGRAM))
    io = parent.manifest["io"]
    model = onnx_export.to_onnx(program, opset=opset, input_names=io["inputs"], output_names=io["outputs"])
    onnx_export.strip_node_metadata(model)
    onnx_export.rename_dims(model, recipe.inputs)
    onnx_export.check(model)
    return program, onnx_export.infer_shapes(model)


def resolve(src: str | Path, opset: int | None, recipe_path: str | Path | None) -> tuple[artifacts.Artifact, Recipe]:
    """The converted artifact and its recipe with --recipe's export/evaluation and --opset applied."""
    parent = artifacts.open_artifact(src, ("converted",), "export")
    recipe = recipe_of(parent)
    if recipe_path is not None:
        recipe = recipes.merge_later_sections(recipe, recipes.load(recipe_path), "export", ("export", "evaluation"))
    if opset is not None:
        recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update={"opset": opset})})
    return parent, recipe


def measure(parent: artifacts.Artifact, recipe: Recipe, program: Any, model: Any, path: Path) -> dict[str, Any]:
    """The report of the ONNX file at `path`: parity, SQNR against fp32, graph summary, evaluation."""
    from quantcli import _torch
    from quantcli.report import evaluate

    sample = example_batch(recipe)
    float_program = _torch.load_program(parent.file(artifacts.FLOAT_PROGRAM))
    names = parent.manifest["io"]["outputs"]
    fp32, int8 = outputs(float_program, recipe, sample), outputs(program, recipe, sample)
    ort = runtime.run(runtime.session(path), sample)
    check = parity.verdict(names, fp32, int8, ort, max_excess_db=recipe.export.parity_max_excess_db,
                           min_sqnr_db=recipe.export.parity_min_sqnr_db)
    report = {"parity": check,
              "sqnr_vs_float_db": {name: figures["ort_vs_fp32_db"] for name, figures in check["per_output"].items()},
              "onnx": {**onnx_export.graph_summary(model), "shapes": onnx_export.shape_coverage(model),
                       "size_bytes": path.stat().st_size}}
    if recipe.evaluation is not None:
        report["evaluation"] = evaluate.evaluate(recipe, float_program, path, parent.manifest["io"])
    return report


def run(src: str | Path, out: str | Path, *, opset: int | None = None, recipe_path: str | Path | None = None,
        force: bool = False) -> StageResult:
    import onnx

    parent, recipe = resolve(src, opset, recipe_path)
    out = Path(out)
    data = data_hashes({f"{name}.data": getattr(recipe, name).data for name in ("calibration", "evaluation")
                        if getattr(recipe, name) is not None})
    options = {"export": recipe.export.model_dump(mode="json")}
    key = artifacts.stage_key("exported", options, parent.digest, data)
    existing = artifacts.check_output_file(out, key, force, onnx_export.read_metadata)
    if existing is not None:
        verify_reused(out)
        return StageResult("exported", out, existing, reused=True)
    read_report(out)  # never overwrite a user's file of that name

    start = time.perf_counter()
    program, model = build_model(parent, recipe, recipe.export.opset)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, tmp_report = artifacts.tmp_sibling(out), artifacts.tmp_sibling(report_path(out))
    try:
        onnx.save(model, str(tmp))
        report = measure(parent, recipe, program, model, tmp)
        passed = report["parity"]["passed"]
        manifest = artifacts.base_manifest("exported", recipe.model_dump(mode="json"), recipe.digest(), parent,
                                           options, key, data)
        manifest.update(io=parent.manifest["io"], files={}, status="ok" if passed else "parity_failed")
        onnx_export.set_metadata(model, manifest)
        onnx.save(model, str(tmp))
        seconds = time.perf_counter() - start
        report.update(onnx_sha256=artifacts.sha256_file(tmp), seconds=round(seconds, 3))
        tmp_report.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_report, report_path(out))
        artifacts.replace_into(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_report.unlink(missing_ok=True)
    if not passed:
        raise NumericsError(f"parity failed: {parity.failure(report['parity'])} (model and report written to {out})",
                            "see the report's parity section; `quantcli inspect` shows it")
    return StageResult("exported", out, manifest, seconds=seconds, details={"report": report})
