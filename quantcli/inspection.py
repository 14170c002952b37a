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
    problem = artifacts.verify_files(path, manifest)  # nothing unverified is loaded
    if problem is not None:
        raise ArtifactError(f"{path} is corrupt: {problem}")
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
    doc = {"path": str(path), "manifest": onnx_export.read_metadata(path), "graph": onnx_export.graph_summary(model)}
    report = path.with_name(path.stem + ".report.json")
    if report.is_file():
        doc["report"] = json.loads(report.read_text())
    return doc


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
    if "report" in doc:
        _show_report(doc["report"])


def _show_report(report: dict[str, Any]) -> None:
    parity = report["parity"]
    floor = f", floor {parity['threshold_db']} dB" if parity["threshold_db"] is not None else ""
    print(f"  parity: {'passed' if parity['passed'] else 'FAILED'}: ONNX Runtime adds {parity['excess_db']:.1f} dB "
          f"of error to the int8 model's (at most {parity['max_excess_db']}); ORT vs PyTorch int8 "
          f"{parity['min_sqnr_db']:.1f} dB{floor}")
    print("  SQNR vs fp32: " + ", ".join(f"{k} {v:.1f} dB" for k, v in report["sqnr_vs_float_db"].items()))
    ev = report.get("evaluation")
    if not ev:
        return
    print(f"  {ev['metric']} on {ev['samples']} held-out samples: fp32 {100 * ev['fp32_torch']:.2f}%  "
          f"int8 ONNX {100 * ev['int8_onnx']:.2f}%  (drop {ev['accuracy_drop_points']:.2f} points)")
    sizes = ev["size_bytes"]
    print(f"  size: fp32 ONNX {sizes['fp32_onnx'] / 1024:.1f} KiB, int8 ONNX {sizes['int8_onnx'] / 1024:.1f} KiB")
    for batch, t in ev["ort_latency"].items():
        print(f"  ORT latency {batch.replace('_', ' ')}: fp32 {t['fp32_ms']:.3f} ms, int8 {t['int8_ms']:.3f} ms "
              f"({t['fp32_ms'] / t['int8_ms']:.2f}x)")
