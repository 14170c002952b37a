"""Writing outputs atomically, and deciding what to do with one that exists: reuse, refuse, replace.

A stage writes into a hidden temporary sibling of its output and renames it into place, so an
interrupted command leaves nothing half-written. Two layouts share that protocol: a stage folder
(`manifest.json` beside the payload) and the exported `.onnx` file (its manifest in
`metadata_props`, its report beside it). An existing output with the same key is reused; one with
another key, or marked failed, is refused unless `--force`; a path quantcli did not write is never
replaced.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from quantcli.artifacts import (
    FLOAT_PROGRAM,
    MANIFEST,
    PROGRAM,
    STATE,
    TIMINGS,
    canonical,
    data_path,
    read_manifest,
    report_path,
    sha256_file,
    verify_files,
)
from quantcli.errors import ArtifactError

NEVER = "choose another output path; it is never replaced"
Why = Callable[[dict[str, Any]], str]  # what differs between an existing output's manifest and the new inputs
FORCE = "pass --force to replace it"


# ------------------------------------------------------------------ temporary siblings
def hidden_sibling(out: Path, tag: str) -> Path:
    """`.<name>.<tag>` beside `out`. A long name is cut and hashed, so that the sibling (with the
    process id and random part temporaries add) stays under the file-name limit whenever `out` does."""
    name = out.name
    if len(name) > 96:
        name = f"{name[:80]}~{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return out.parent / f".{name}.{tag}"


def sibling_prefix(out: Path, tag: str) -> str:
    return hidden_sibling(out, tag).name + "-"


def tmp_sibling(out: Path, tag: str = "tmp") -> Path:
    """A hidden, unique sibling `.<name>.<tag>-<pid>-<random>`; stale ones of dead processes are removed."""
    remove_stale(out, tag)
    return out.parent / f"{sibling_prefix(out, tag)}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale(out: Path, tag: str) -> None:
    """Remove `.<name>.<tag>-<pid>-*` siblings whose process is gone (killed with SIGKILL, power loss).

    SIGINT and SIGTERM clean up themselves; this covers what they cannot.
    """
    prefix = sibling_prefix(out, tag)
    for path in out.parent.glob(glob.escape(prefix) + "*"):
        pid = path.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove(path: Path) -> None:
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
    """Move `tmp` to `out`, replacing an existing quantcli output there."""
    with _signals_held():
        trash = None
        if out.exists():
            trash = tmp_sibling(out, "old")
            os.replace(out, trash)
        try:
            os.replace(tmp, out)
        except OSError:
            if trash is not None:  # put the previous output back: nothing half-replaced
                os.replace(trash, out)
            raise
    if trash is not None:
        remove(trash)


@contextlib.contextmanager
def parent_folders(out: Path) -> Iterator[None]:
    """Create `out`'s missing parent folders; remove the ones created if the body fails."""
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is not a folder" if blocker else (exc.strerror or str(exc))
        raise ArtifactError(f"cannot write {out}: {why}", "choose another output path") from None
    try:
        yield
    except BaseException:
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a parent's file (no extra disk) or copy it where links are not possible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ------------------------------------------------------------------ the two layouts
class Staging:
    """A stage folder being written in a temporary sibling; `seal` writes its manifest."""

    def __init__(self, out: Path, tmp: Path):
        self.out = out
        self.tmp = tmp
        self.manifest: dict[str, Any] = {}

    def seal(self, manifest: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
        files = {}
        for fpath in sorted(p for p in self.tmp.iterdir() if p.is_file() and p.name not in (MANIFEST, TIMINGS)):
            files[fpath.name] = {"sha256": sha256_file(fpath), "size": fpath.stat().st_size}
        manifest = {**manifest, "files": files}
        (self.tmp / MANIFEST).write_bytes(canonical(manifest))
        (self.tmp / TIMINGS).write_bytes(canonical({k: round(v, 3) for k, v in timings.items()}))
        self.manifest = manifest
        return manifest

    def make(self) -> None:
        self.tmp.mkdir()

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> None:
        replace_into(self.tmp, self.out)


class OnnxStaging(Staging):
    """The exported `.onnx` being written: `tmp` is the model file, under its final name in a hidden temporary
    folder (`folder`), so that an external data file beside it (`model.onnx.data`, named in the model) is
    found there while the export measures it; `report` goes beside the output.

    The files cannot be renamed as one: the data file goes first, then the model, then its report, which
    records the sha256 of both. A crash between the renames leaves files whose hashes disagree with the
    report, which is never reused or believed (`check_onnx`).
    """

    def __init__(self, out: Path, tmp: Path):
        super().__init__(out, tmp / out.name)
        self.folder = tmp
        self.report: dict[str, Any] = {}
        self.tmp_report = tmp / report_path(out).name

    def seal(self, manifest: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
        import onnx

        from quantcli.onnx.export import set_metadata

        manifest = {**manifest, "files": {}}
        model = onnx.load(str(self.tmp), load_external_data=False)  # the data file is not rewritten
        set_metadata(model, manifest)
        onnx.save(model, str(self.tmp))
        data = data_path(self.tmp)
        report = {
            **self.report,
            "model": self.out.name,
            "onnx_sha256": sha256_file(self.tmp),
            **({"data": data.name, "data_sha256": sha256_file(data)} if data.exists() else {}),
            "seconds": round(timings["seconds"], 3),
        }
        self.tmp_report.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        self.manifest, self.report = manifest, report
        return manifest

    def make(self) -> None:
        self.folder.mkdir()
        self.tmp.touch(exist_ok=False)  # an unwritable output fails here, before the export's work

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def commit(self) -> None:
        with _signals_held():  # an interrupt lands after the renames; only a kill can fall between
            try:
                data = data_path(self.tmp)
                if data.exists():
                    replace_into(data, data_path(self.out))
                elif data_path(self.out).exists() and _names_data(self.out):
                    remove(data_path(self.out))  # an earlier export's tensors, which this model does not read
                replace_into(self.tmp, self.out)
                os.replace(self.tmp_report, report_path(self.out))
            finally:
                shutil.rmtree(self.folder, ignore_errors=True)


def _names_data(out: Path) -> bool:
    """Whether the report beside `out` (quantcli's) names an external data file."""
    try:
        return "data" in (read_report(out) or {})
    except ArtifactError:
        return False


@contextlib.contextmanager
def staging(out: Path, onnx_file: bool = False) -> Iterator[Staging]:
    """Write into a hidden temporary sibling; on success move it to `out`, else remove it.

    Whichever step finds the output unwritable (its folder, the temporary, a write in the body, the
    final rename), it is one ArtifactError (exit 4), and nothing is left behind.
    """
    check_name(out, onnx_file)
    with parent_folders(out):
        st = (OnnxStaging if onnx_file else Staging)(out, tmp_sibling(out))
        try:
            st.make()
        except OSError as exc:
            raise unwritable(out, exc) from None
        try:
            yield st
        except BaseException as exc:
            st.discard()
            if isinstance(exc, OSError) and _writing(exc, out):
                raise unwritable(out, exc) from exc
            raise
        try:
            st.commit()
        except OSError as exc:
            st.discard()
            raise unwritable(out, exc) from exc


def unwritable(out: Path, exc: OSError) -> ArtifactError:
    return ArtifactError(f"cannot write {out}: {exc.strerror or exc}", "choose another output path")


# errnos that mean the output cannot be written, whichever file the error names
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _writing(exc: OSError, out: Path) -> bool:
    """Whether `exc` came from writing the output: its temporary or hidden siblings (`.<name>.*`), or a full disk."""
    if exc.errno in _FULL:
        return True
    name = os.fspath(exc.filename) if exc.filename is not None else ""
    ours = (str(out), str(hidden_sibling(out, "")))
    return bool(name) and name.startswith(ours)


NAME_MAX = 255  # bytes, where the file system does not say


def check_name(out: Path, onnx_file: bool) -> None:
    """Refuse, before any work, an output whose name (or its report's, beside an .onnx) the file system
    cannot hold; hidden siblings are shortened (`hidden_sibling`), the names users chose are not."""
    names = [out.name] + ([report_path(out).name] if onnx_file else [])
    limit = _name_max(out.parent)
    for name in names:
        if len(os.fsencode(name)) > limit:
            which = "its report's name" if name != out.name else "the name"
            raise ArtifactError(
                f"cannot write {out}: {which} is {len(os.fsencode(name))} bytes, over the file-name limit of {limit}",
                "choose a shorter output name",
            )


def _name_max(folder: Path) -> int:
    """The file-name limit of the nearest existing folder at or above `folder`."""
    for candidate in [folder, *folder.parents]:
        try:
            return int(os.pathconf(candidate, "PC_NAME_MAX"))
        except (OSError, ValueError):
            continue
    return NAME_MAX


# ------------------------------------------------------------------ existing outputs
# Names a stage folder may hold; a folder with an unreadable manifest is only taken for a
# (corrupt) quantcli artifact, and replaced with --force, when it holds nothing else.
KNOWN_FILES = frozenset({MANIFEST, TIMINGS, PROGRAM, FLOAT_PROGRAM, STATE})


def check_output(
    out: Path, key: str, force: bool, stage: str | None = None, why: Why | None = None
) -> dict[str, Any] | None:
    """Decide what to do with an existing stage folder at `out`.

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
        raise ArtifactError(f"{out} exists and is a corrupt quantcli artifact (unreadable {MANIFEST})", FORCE)
    _refuse_unusable(out, manifest, key, stage, why)
    problem = verify_files(out, manifest)
    if problem is not None:
        raise ArtifactError(f"{out} exists but is corrupt: {problem}", FORCE)
    return manifest


def _refuse_unusable(out: Path, manifest: dict[str, Any], key: str, stage: str | None, why: Why | None) -> None:
    if stage is not None and manifest["stage"] != stage:
        raise ArtifactError(
            f"{out} exists and is a {manifest['stage']} artifact, not a {stage} one",
            "choose another output path, or pass --force to replace it",
        )
    if manifest.get("status", "ok") != "ok":
        raise ArtifactError(f"{out} exists and is marked {manifest['status']}", FORCE)
    if manifest.get("key") != key:
        reason = f": {why(manifest)}" if why is not None else ""
        raise ArtifactError(f"{out} exists and was made from other inputs or options{reason}", FORCE)


def _owned_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of the quantcli artifact at `out` (None when it is unreadable); raises if `out` is not one."""
    if not (out.is_dir() and (out / MANIFEST).is_file()):
        raise ArtifactError(f"{out} exists and is not a quantcli artifact", NEVER)
    names = {p.name for p in out.iterdir()}
    try:
        manifest = read_manifest(out)
    except ArtifactError:
        if PROGRAM in names and names <= KNOWN_FILES:
            return None
        raise ArtifactError(f"{out} exists and is not a quantcli artifact", NEVER) from None
    foreign = sorted(names - set(manifest["files"]) - {MANIFEST, TIMINGS})
    if foreign:
        raise ArtifactError(
            f"{out} holds files quantcli did not write ({', '.join(foreign[:3])})",
            "move them away or choose another output path; it is never replaced",
        )
    return manifest


def read_report(out: Path) -> dict[str, Any] | None:
    """The quantcli report beside the `.onnx` at `out`, or None if there is none; a foreign file is refused."""
    path = report_path(out)
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        report = None
    if not isinstance(report, dict) or "onnx_sha256" not in report:
        raise ArtifactError(f"{path} exists and was not written by quantcli export", NEVER)
    return report


def check_onnx(out: Path, key: str, force: bool, why: Why | None = None) -> dict[str, Any] | None:
    """check_output for the exported `.onnx`, whose manifest lives in its metadata, its report beside it.

    A model whose report records another sha256 (a crash between the two renames, or an edit) is
    never reused: with the same key it is redone, otherwise refused unless --force. A model that
    does not parse is quantcli's only when its report beside it says so, and --force replaces it.
    """
    from quantcli.onnx.export import read_metadata

    if not out.exists():
        read_report(out)  # never overwrite a user's file of that name
        return None
    if out.is_dir():
        raise ArtifactError(f"{out} is a folder", "name an .onnx file with -o")
    report = read_report(out)
    try:
        fields = read_metadata(out)
    except Exception:
        fields = None
    if (not fields or fields.get("stage") != "exported") and report is not None and report.get("model") == out.name:
        if force:
            return None
        raise ArtifactError(
            f"{out} exists and is a corrupt quantcli model (its report names it; the file does not parse as one)", FORCE
        )
    if not fields or fields.get("stage") != "exported":
        raise ArtifactError(f"{out} exists and was not written by quantcli export", NEVER)
    if force:
        return None
    intact = report is not None and report["onnx_sha256"] == sha256_file(out) and data_intact(out, report)
    if fields.get("key") == key and fields.get("status") == "ok":
        return fields if intact else None  # a torn or altered pair is never reused: redo it
    _refuse_unusable(out, {**fields, "stage": "exported"}, key, None, why)
    return None


def data_intact(out: Path, report: dict[str, Any]) -> bool:
    """Whether the external data file beside `out` is the one its report records (none, where it records none)."""
    data = data_path(out)
    if "data_sha256" not in report:
        return True
    return data.is_file() and report["data_sha256"] == sha256_file(data)


def previous_manifest(out: Path, onnx_file: bool) -> dict[str, Any] | None:
    """The manifest of the quantcli output at `out`, or None where there is none or it does not read."""
    if onnx_file:
        from quantcli.onnx.export import read_metadata

        try:
            return read_metadata(out) if out.is_file() else None
        except Exception:
            return None
    try:
        return read_manifest(out)
    except ArtifactError:
        return None
