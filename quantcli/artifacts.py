"""The artifact folder contract: file names, manifests, hashes, atomic writes and reuse.

Every stage writes `<out>/manifest.json` beside its payload. The manifest is deterministic (the
same inputs give the same bytes); timings live in `timings.json`, outside the hashed part.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import shutil
import signal
import threading
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from quantcli import __version__
from quantcli.errors import ArtifactError, InputError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TIMINGS = "timings.json"
PROGRAM = "program.pt2"  # a torch.export ExportedProgram
FLOAT_PROGRAM = "float.pt2"  # the captured fp32 program, kept beside a converted one for reports
STATE = "state.pt"  # state_dict of the prepared module (observers, fake quant, weights)
CHECKPOINT = "checkpoint.pt"  # training checkpoint inside .<out>.partial/

# stage name -> the command that produces it
PRODUCERS = {
    "captured": "quantcli capture",
    "prepared": "quantcli prepare",
    "calibrated": "quantcli calibrate",
    "trained": "quantcli train",
    "converted": "quantcli convert",
    "exported": "quantcli export",
}
LIBRARIES = ("torch", "torchao", "onnx", "onnxruntime", "onnxscript")


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


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def stage_key(stage: str, options: dict[str, Any], parent: str | None, data: dict[str, str]) -> str:
    """What makes a stage output reusable: stage, options, input artifact, data files, version."""
    blob = {"stage": stage, "options": options, "parent": parent, "data": data, "quantcli": __version__}
    return hashlib.sha256(canonical(blob)).hexdigest()


@dataclass
class Artifact:
    """A verified stage folder on disk."""

    path: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical(self.manifest)).hexdigest()

    def file(self, name: str) -> Path:
        return self.path / name


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST if path.is_dir() else None
    if mpath is None or not mpath.is_file():
        raise ArtifactError(f"{path} is not a quantcli artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{mpath} is corrupt: {exc}") from None
    if not _is_manifest(manifest):
        raise ArtifactError(f"{mpath} is corrupt: not a quantcli manifest")
    return manifest


def _is_manifest(manifest: Any) -> bool:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stage"), str):
        return False
    files = manifest.get("files")
    return isinstance(files, dict) and all(
        isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..")
        and isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("size"), int)
        for name, info in files.items())


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
        need = " or ".join(f"a {s} artifact (made by `{PRODUCERS[s]}`)" for s in expect)
        raise InputError(f"{path} does not exist", f"`quantcli {command}` needs {need}")
    manifest = read_manifest(path)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has artifact schema {manifest.get('schema_version')}, this quantcli reads {SCHEMA_VERSION}",
            "recreate it with this version of quantcli",
        )
    if manifest["stage"] not in expect:
        need = " or ".join(f"{s} (made by `{PRODUCERS[s]}`)" for s in expect)
        raise ArtifactError(f"{path} is a {manifest['stage']} artifact; `quantcli {command}` needs {need}")
    if manifest.get("status", "ok") != "ok":
        raise ArtifactError(f"{path} is marked {manifest['status']}; it is not a usable output")
    problem = verify_files(path, manifest)
    if problem is not None:
        raise ArtifactError(f"{path} is corrupt: {problem}", f"recreate it with `{PRODUCERS.get(manifest['stage'], 'quantcli')}`")
    return Artifact(path, manifest)


def is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


# Names a stage folder may hold; a folder with an unreadable manifest is only taken for a
# (corrupt) quantcli artifact, and replaced with --force, when it holds nothing else.
KNOWN_FILES = frozenset({MANIFEST, TIMINGS, PROGRAM, FLOAT_PROGRAM, STATE})


def check_output(out: Path, key: str, force: bool, stage: str | None = None) -> dict[str, Any] | None:
    """Decide what to do with an existing output path.

    Returns the existing manifest when it is a complete `stage` output with the same key (reuse);
    None when the path is free or may be replaced (--force); raises ArtifactError otherwise.
    A path that is not a quantcli artifact, or holds files quantcli did not write, is never replaced.
    """
    if not out.exists():
        return None
    manifest = _owned_manifest(out)
    if force:
        return None
    if manifest is None:
        raise ArtifactError(f"{out} exists and is a corrupt quantcli artifact (unreadable {MANIFEST})",
                            "pass --force to replace it")
    if stage is not None and manifest["stage"] != stage:
        raise ArtifactError(f"{out} exists and is a {manifest['stage']} artifact, not a {stage} one",
                            "choose another output path, or pass --force to replace it")
    if manifest.get("status", "ok") != "ok":
        raise ArtifactError(f"{out} exists and is marked {manifest['status']}", "pass --force to replace it")
    if manifest.get("key") != key:
        raise ArtifactError(f"{out} exists and was made from other inputs or options", "pass --force to replace it")
    problem = verify_files(out, manifest)
    if problem is not None:
        raise ArtifactError(f"{out} exists but is corrupt: {problem}", "pass --force to replace it")
    return manifest


def _owned_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of the quantcli artifact at `out` (None when it is unreadable); raises if `out` is not one."""
    never = "choose another output path; it is never replaced"
    if not (out.is_dir() and (out / MANIFEST).is_file()):
        raise ArtifactError(f"{out} exists and is not a quantcli artifact", never)
    names = {p.name for p in out.iterdir()}
    try:
        manifest = read_manifest(out)
    except ArtifactError:
        if PROGRAM in names and names <= KNOWN_FILES:
            return None
        raise ArtifactError(f"{out} exists and is not a quantcli artifact", never) from None
    foreign = sorted(names - set(manifest["files"]) - {MANIFEST, TIMINGS})
    if foreign:
        raise ArtifactError(f"{out} holds files quantcli did not write ({', '.join(foreign[:3])})",
                            "move them away or choose another output path; it is never replaced")
    return manifest


@dataclass
class Staging:
    """A temporary folder beside the output; `commit` renames it into place."""

    out: Path
    tmp: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    def write_manifest(self, manifest: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
        files = {}
        for fpath in sorted(p for p in self.tmp.iterdir() if p.is_file() and p.name not in (MANIFEST, TIMINGS)):
            files[fpath.name] = {"sha256": sha256_file(fpath), "size": fpath.stat().st_size}
        manifest = {**manifest, "files": files}
        (self.tmp / MANIFEST).write_bytes(canonical(manifest))
        (self.tmp / TIMINGS).write_bytes(canonical({k: round(v, 3) for k, v in timings.items()}))
        self.manifest = manifest
        return manifest


def tmp_sibling(out: Path, tag: str = "tmp") -> Path:
    """A hidden, unique sibling `.<name>.<tag>-<pid>-<random>`; stale ones of dead processes are removed."""
    remove_stale(out, tag)
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale(out: Path, tag: str) -> None:
    """Remove `.<name>.<tag>-<pid>-*` siblings whose process is gone (killed with SIGKILL, power loss).

    SIGINT and SIGTERM clean up themselves; this covers what they cannot.
    """
    prefix = f".{out.name}.{tag}-"
    for path in out.parent.glob(glob.escape(prefix) + "*"):
        pid = path.name[len(prefix):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while an output is swapped in: an interrupt lands after, never between."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def replace_into(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`, replacing an existing quantcli artifact or file there."""
    with _signals_held():
        if out.exists():
            trash = tmp_sibling(out, "old")
            os.replace(out, trash)
            os.replace(tmp, out)
        else:
            trash = None
            os.replace(tmp, out)
    if trash is not None:
        _remove(trash)


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Staging]:
    """Write into a hidden temporary sibling; on success rename it to `out`, else remove it."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_sibling(out)
        tmp.mkdir()
    except OSError as exc:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is not a folder" if blocker else (exc.strerror or str(exc))
        raise ArtifactError(f"cannot write {out}: {why}", "choose another output path") from None
    stage = Staging(out, tmp)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_into(tmp, out)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a parent's file (no extra disk) or copy it where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def base_manifest(stage: str, recipe: dict[str, Any], recipe_hash: str, parent: Artifact | None,
                  options: dict[str, Any], key: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
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


def check_output_file(out: Path, key: str, force: bool, read_fields: Any) -> dict[str, Any] | None:
    """check_output for a single-file output (the .onnx), whose manifest lives in its metadata."""
    if not out.exists():
        return None
    if out.is_dir():
        raise ArtifactError(f"{out} is a folder", "name an .onnx file with -o")
    try:
        fields = read_fields(out)
    except Exception:
        fields = {}
    if fields.get("stage") != "exported":
        raise ArtifactError(f"{out} exists and was not written by quantcli export", "choose another output path")
    if force:
        return None
    if fields.get("key") == key and fields.get("status") == "ok":
        return fields
    why = "is marked " + fields.get("status", "unknown") if fields.get("status") != "ok" else "was made from other inputs"
    raise ArtifactError(f"{out} exists and {why}", "pass --force to replace it")
