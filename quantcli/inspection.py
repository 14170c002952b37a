"""`quantcli inspect`: the manifest and a graph summary of a stage folder or an exported .onnx."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantcli import artifacts
from quantcli.errors import ArtifactError, InputError


def inspect(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_file() and path.suffix == ".onnx":
        return _inspect_onnx(path)
    manifest = artifacts.read_manifest(path)
    doc: dict[str, Any] = {"path": str(path), "manifest": manifest}
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
    return {"path": str(path), "manifest": onnx_export.read_metadata(path), "graph": onnx_export.graph_summary(model)}


def show(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return
    manifest = doc["manifest"]
    print(f"{doc['path']}: {manifest.get('stage', '?')} artifact ({manifest.get('status', 'ok')})")
    for key in ("quantcli_version", "recipe_hash", "parent", "options"):
        if key in manifest:
            print(f"  {key}: {json.dumps(manifest[key], sort_keys=True)}")
    for name, info in manifest.get("files", {}).items():
        print(f"  file {name}: {info['size']} bytes sha256 {info['sha256'][:12]}")
    graph = doc.get("graph", {})
    ops = graph.get("ops", {})
    if ops:
        print("  ops: " + ", ".join(f"{k}={v}" for k, v in ops.items()))
