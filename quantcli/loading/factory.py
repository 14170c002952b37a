"""Import a user callable named "file.py:callable" or "package.module:callable".

Model factories, data factories and custom losses are user code: importing them runs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import hashlib
import sys
from pathlib import Path
from typing import Any, Callable

from quantcli.errors import InputError
from quantcli.references import split_callable


def load_callable(spec: str, what: str, error: type[InputError] = InputError) -> Callable[..., Any]:
    target = split_callable(spec)
    if target is None:
        raise error(f'{what} {spec!r} must look like "file.py:callable" or "package.module:callable"')
    location, attr = target
    module = _import_file(location, what, error) if location.endswith(".py") else _import_module(location, what, error)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise error(f"{what} {spec!r}: {location} has no callable named {attr!r}")
    return fn


def _import_file(location: str, what: str, error: type[InputError]) -> Any:
    path = Path(location)
    if not path.is_file():
        raise error(f"{what}: file not found: {path}")
    name = "quantcli_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    sys.modules[name] = module  # before running it, as importlib does: dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise error(f"{what}: cannot import {path}: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(location: str, what: str, error: type[InputError]) -> Any:
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(location)
    except Exception as exc:
        raise error(f"{what}: cannot import {location}: {type(exc).__name__}: {exc}") from exc
