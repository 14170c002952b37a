"""`quantcli inspect`: the manifest and a graph summary of a stage folder or an exported .onnx; what an
onnxruntime-genai folder holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli import artifacts, staging
from quantcli.errors import ArtifactError, InputError


def inspect(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_file() and path.suffix == ".onnx":
        return _inspect_onnx(path)
    if path.is_dir() and (path / artifacts.GENAI_CONFIG).is_file():  # an onnxruntime-genai folder export wrote
        from quantcli import genai

        return genai.describe(path)
    manifest = artifacts.read_manifest(path)
    problem = artifacts.verify_files(path, manifest)  # nothing unverified is loaded
    if problem is not None:
        raise ArtifactError(f"{path} is corrupt: {problem}")
    doc: dict[str, Any] = {"path": str(path), "manifest": manifest, **_target(manifest)}
    program = path / artifacts.PROGRAM
    if program.is_file():
        from quantcli import _torch
        from quantcli.stages.convert import count_ops

        doc["graph"] = {"ops": count_ops(_torch.load_program(program).graph_module)}
    return doc


def _inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx

    from quantcli.onnx import export as onnx_export

    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ArtifactError(f"{path} is not a readable ONNX model: {exc}") from None
    manifest = onnx_export.read_metadata(path)
    doc = {
        "path": str(path),
        "manifest": manifest,
        **_target(manifest),
        "graph": onnx_export.graph_summary(model),
        "io": onnx_export.io_summary(model),
    }
    report = staging.read_report(path)
    if (
        report is not None
        and report["onnx_sha256"] == artifacts.sha256_file(path)
        and staging.data_intact(path, report)
    ):
        doc["report"] = report
    elif report is not None:  # an interrupted or altered export: its report describes another model
        doc["report_mismatch"] = f"{artifacts.report_path(path).name} records another sha256 than {path.name}'s"
    from quantcli import genai

    if genai.current(path):
        doc["genai_folder"] = str(artifacts.genai_path(path))
    return doc


def _target(manifest: dict[str, Any]) -> dict[str, str]:
    """{"target": what the model was built for} once prepare has resolved the recipe's target_cpu, else {}."""
    from quantcli.quantizers.cpu import describe

    quantization = (manifest.get("recipe") or {}).get("quantization") or {}
    if quantization.get("target_cpu", "auto") == "auto" or quantization.get("reduce_range", "auto") == "auto":
        return {}
    return {"target": describe(quantization["target_cpu"], quantization["reduce_range"])}
