"""File and callable references in a recipe: resolving, splitting, checking, without importing them.

No torch and no pydantic here: `validate` checks a raw recipe document's files with these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def resolve_path(value: str, base: Path) -> str:
    """Resolve a data path, or the file of "file.py:callable", against the recipe's folder.

    "package.module:callable" is left as written.
    """
    file_part, sep, attr = value.rpartition(":")
    if sep and file_part.endswith(".py"):
        return f"{(base / file_part).resolve()}:{attr}"
    if sep and _is_module_name(file_part):
        return value
    return str((base / value).resolve())


def _is_module_name(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def split_callable(value: str) -> tuple[str, str] | None:
    """("file.py" or "package.module", "callable") when `value` names a callable, else None."""
    file_part, sep, attr = value.rpartition(":")
    if sep and attr.isidentifier() and (file_part.endswith(".py") or "/" not in file_part):
        return file_part, attr
    return None


def exists(path: str | Path, kind: str = "any") -> bool:
    """Path.exists/is_file that answers False for names the OS refuses (too long, not a path)."""
    try:
        return Path(path).is_file() if kind == "file" else Path(path).exists()
    except (OSError, ValueError):
        return False


# Every recipe key whose value names a file, a folder or a callable ("file.py:callable").
FILE_KEYS = (
    "model.factory",
    "model.huggingface",
    "model.weights",
    "model.checkpoint",
    "calibration.data",
    "training.data",
    "training.loss",
    "evaluation.data",
)


def file_values(doc: Any) -> list[tuple[str, str]]:
    """(key path, value) of the file references in a recipe document, raw (possibly invalid) or dumped.

    A training loss is a file reference only when it names a callable; otherwise it is a built-in name.
    """
    refs = []
    for key in FILE_KEYS:
        section, field = key.split(".")
        part = doc.get(section) if isinstance(doc, dict) else None
        value = part.get(field) if isinstance(part, dict) else None
        if isinstance(value, str) and value and (key != "training.loss" or ":" in value):
            refs.append((key, value))
    return refs


def file_problems(data: Any, base: Path) -> list[str]:
    """Referenced files (and modules) that do not exist, checked without importing them.

    Works on the raw document, so `validate` reports them together with any schema problems.
    """
    problems = []
    for key, value in file_values(data):
        if "\0" in value:
            continue  # a schema problem, reported as such
        resolved = resolve_path(value, base)
        target = split_callable(resolved)
        if target is not None and not target[0].endswith(".py"):
            if not _module_exists(target[0]):
                problems.append(f"{key}: no module named {target[0]!r}")
        elif target is not None and not exists(target[0], "file"):
            problems.append(f"{key}: file not found: {target[0]}")
        elif target is None and ":" not in value and not exists(resolved):
            problems.append(f"{key}: file not found: {resolved}")
    return problems


def _module_exists(name: str) -> bool:
    """Whether the top-level package of `name` can be found (from the working folder too), unimported."""
    import importlib.util
    import os
    import sys

    top = name.split(".")[0]
    if top in sys.modules:
        return True
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False
    finally:
        if added:
            sys.path.remove(cwd)
