"""The artifact contract: the stages, their file names, manifests, hashes, keys and verification.

Every stage output carries a manifest: `<out>/manifest.json` beside a stage folder's payload, or
the `metadata_props` of the exported `.onnx` file. The manifest is deterministic (the same inputs
give the same bytes); timings live outside it (`timings.json`, the export report). Writing outputs
atomically, reusing and replacing them is `quantcli.staging`'s part.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from quantcli import __version__
from quantcli.errors import ArtifactError, InputError

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
TIMINGS = "timings.json"
PROGRAM = "program.pt2"  # a torch.export ExportedProgram
FLOAT_PROGRAM = "float.pt2"  # the captured fp32 program, kept beside a converted one for reports
# state_dict of the prepared module (observers, fake quant, weights); a converted artifact keeps its parent's
STATE = "state.pt"
DATA_SUFFIX = ".data"  # an exported model's external data (quantcli.onnx.external)
WEIGHT_CODES = "weight_codes.pt"  # weight-only: each quantized linear's codes, scales and zero points
CHECKPOINT = "checkpoint.pt"  # training checkpoint inside .<out>.partial/
REPORT_SUFFIX = ".report.json"  # the export report beside `<name>.onnx`: `<name>.report.json`
GENAI_SUFFIX = ".genai"  # a decoder's onnxruntime-genai folder beside `<name>.onnx`: `<name>.genai/`
GENAI_CONFIG = "genai_config.json"


@dataclass(frozen=True)
class Stage:
    """A stage: the command that produces its output, and the recipe sections it consumes.

    The consumed sections are the only ones that command's `--recipe` may change, and they key
    the reuse of its output; sections consumed earlier in an artifact's chain are fixed.
    """

    command: str
    consumes: tuple[str, ...]


STAGES: dict[str, Stage] = {
    "captured": Stage("capture", ("model", "inputs", "outputs")),
    "prepared": Stage("prepare", ("quantization",)),
    "calibrated": Stage("calibrate", ("calibration",)),
    "trained": Stage("train", ("training",)),
    "converted": Stage("convert", ()),
    "exported": Stage("export", ("export", "evaluation")),
}
# The libraries whose versions are recorded in every manifest and key every stage's reuse.
LIBRARIES = ("torch", "torchao", "onnx", "onnxruntime", "onnxscript", "transformers", "timm", "torchvision", "datasets")


def producer(stage: str) -> str:
    """`quantcli <command>`, the command that produces `stage`."""
    return f"quantcli {STAGES[stage].command}"


def genai_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.stem + GENAI_SUFFIX)


def report_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.stem + REPORT_SUFFIX)


def data_path(onnx_path: Path) -> Path:
    """The external data file of a model too large for one protobuf: `model.onnx.data` beside `model.onnx`."""
    return onnx_path.with_name(onnx_path.name + DATA_SUFFIX)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    """Hash of a file, or of a folder's files (names and contents), for data sources."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(child.relative_to(path)).encode() + b"\0" + sha256_file(child).encode())
    return digest.hexdigest()


def canonical(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode()


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return tuple(versions.items())


def library_versions() -> dict[str, str]:
    """Python's and each of LIBRARIES' version ("absent" when not installed)."""
    return dict(_versions())


def stage_key(stage: str, options: dict[str, Any], parent: str | None, data: dict[str, str]) -> str:
    """What makes a stage output reusable: stage, options, input artifact, data, quantcli's and the libraries'
    versions (docs/reuse.md says what each stage's data covers)."""
    blob = {
        "stage": stage,
        "options": options,
        "parent": parent,
        "data": data,
        "quantcli": __version__,
        "versions": library_versions(),
    }
    return hashlib.sha256(canonical(blob)).hexdigest()


def why_redone(previous: dict[str, Any], options: dict[str, Any], parent: str | None, data: dict[str, str]) -> str:
    """What differs between the manifest of an existing output and the inputs of a new one, in a few words:
    "model source netdef.py changed", "torch 2.13.0 -> 2.14.0", "calibration.num_batches changed"."""
    reasons = [
        f"{name} {old} -> {new}" for name, old, new in _changed(previous.get("versions") or {}, library_versions())
    ]
    if previous.get("quantcli_version") != __version__:
        reasons.append(f"quantcli {previous.get('quantcli_version')} -> {__version__}")
    for key, old, new in _changed(previous.get("data") or {}, data):
        reasons.append(f"{key} {'added' if old is None else 'removed' if new is None else 'changed'}")
    old_options, new_options = dict(previous.get("options") or {}), dict(options)
    reasons += [f"{path} changed" for path in _paths(old_options.pop("recipe", {}), new_options.pop("recipe", {}))]
    reasons += [f"option {name} changed" for name, _, _ in _changed(old_options, new_options)]
    if (previous.get("parent") or {}).get("sha256") != parent:
        reasons.append("its input artifact changed")
    if not reasons:
        return "made with another key"
    return "; ".join(reasons[:3]) + (f" and {len(reasons) - 3} more" if len(reasons) > 3 else "")


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted key paths where two recipe documents differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [p for k in sorted(set(old) | set(new)) for p in _paths(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if old != new else []


@dataclass
class Artifact:
    """A verified stage output on disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def chain(self) -> list[str]:
        """The stages that made it, first to last (it included)."""
        return list(self.manifest["chain"])

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical(self.manifest)).hexdigest()

    def file(self, name: str) -> Path:
        return self.path / name


def base_manifest(
    stage: str,
    recipe: dict[str, Any],
    recipe_hash: str,
    parent: Artifact | None,
    options: dict[str, Any],
    key: str,
    data: dict[str, str],
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "chain": (parent.chain if parent else []) + [stage],
        "status": "ok",
        "quantcli_version": __version__,
        "versions": library_versions(),
        "recipe": recipe,
        "recipe_hash": recipe_hash,
        "parent": {"stage": parent.stage, "sha256": parent.digest} if parent else None,
        "options": options,
        "data": data,
        "key": key,
    }


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST if path.is_dir() else None
    if mpath is None or not mpath.is_file():
        raise ArtifactError(f"{path} is not a quantcli artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{mpath} is corrupt: {exc}") from None
    if not is_manifest(manifest):
        raise ArtifactError(f"{mpath} is corrupt: not a quantcli manifest")
    return manifest


def is_manifest(manifest: Any) -> bool:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stage"), str):
        return False
    files = manifest.get("files")
    return isinstance(files, dict) and all(
        isinstance(name, str)
        and Path(name).name == name
        and name not in ("", ".", "..")
        and isinstance(info, dict)
        and isinstance(info.get("sha256"), str)
        and isinstance(info.get("size"), int)
        for name, info in files.items()
    )


def verify_files(path: Path, manifest: dict[str, Any]) -> str | None:
    """What is wrong with the files of the artifact at `path` (missing, truncated, altered), or None."""
    for name, info in manifest["files"].items():
        fpath = path / name
        if not fpath.is_file():
            return f"{name} is missing"
        size = fpath.stat().st_size
        if size != info["size"]:
            return f"{name} is truncated or altered: {size} bytes, the manifest records {info['size']}"
        if sha256_file(fpath) != info["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


def open_artifact(path: str | Path, expect: tuple[str, ...], command: str) -> Artifact:
    """Open `path` as one of the `expect` stages for `command`, verifying every file's sha256."""
    path = Path(path)
    if not path.exists():
        need = " or ".join(f"a {s} artifact (made by `{producer(s)}`)" for s in expect)
        raise InputError(f"{path} does not exist", f"`quantcli {command}` needs {need}")
    manifest = read_manifest(path)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has artifact schema {manifest.get('schema_version')}, this quantcli reads {SCHEMA_VERSION}",
            "recreate it with this version of quantcli",
        )
    if manifest["stage"] not in expect:
        need = " or ".join(f"{s} (made by `{producer(s)}`)" for s in expect)
        raise ArtifactError(f"{path} is a {manifest['stage']} artifact; `quantcli {command}` needs {need}")
    if manifest.get("status", "ok") != "ok":
        raise ArtifactError(f"{path} is marked {manifest['status']}; it is not a usable output")
    problem = verify_files(path, manifest)
    if problem is not None:
        raise ArtifactError(
            f"{path} is corrupt: {problem}",
            f"recreate it with `{producer(manifest['stage'])}`" if manifest["stage"] in STAGES else None,
        )
    return Artifact(path, manifest)


def is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()
