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


def _raw_references(data: Any) -> list[tuple[str, str]]:
    """(key path, value) of the file references in a raw, possibly invalid, recipe document."""
    refs = []
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and isinstance(model.get("factory"), str):
        refs.append(("model.factory", model["factory"]))
    for name in ("calibration", "training", "evaluation"):
        section = data.get(name) if isinstance(data, dict) else None
        if isinstance(section, dict) and isinstance(section.get("data"), str) and section["data"]:
            refs.append((f"{name}.data", section["data"]))
        if name == "training" and isinstance(section, dict) and isinstance(section.get("loss"), str) \
                and ":" in section["loss"]:
            refs.append(("training.loss", section["loss"]))
    return refs


def file_problems(data: Any, base: Path) -> list[str]:
    """Referenced files (and modules) that do not exist, checked without importing them.

    Works on the raw document, so `validate` reports them together with any schema problems.
    """
    problems = []
    for key, value in _raw_references(data):
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
