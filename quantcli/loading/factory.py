"""Import a user callable named "file.py:callable" or "package.module:callable".

Model factories, data factories and custom losses are user code: importing them runs it. Each
import records the user source files it brought in (every module new in `sys.modules` whose file
lies outside the installed packages and the standard library), so that a stage's key can cover
them; an import whose recorded files have changed since is done again, in a long-lived process too.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.machinery
import importlib.util
import site
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from quantcli.errors import InputError
from quantcli.references import split_callable


@dataclass(frozen=True)
class Imported:
    """What importing a user module brought in: the user modules' names, and their files -> sha256."""

    modules: tuple[str, ...]
    files: dict[str, str]

    def fresh(self) -> bool:
        return all(_sha256(Path(path)) == digest for path, digest in self.files.items())


_IMPORTED: dict[str, Imported] = {}  # module name -> what its import brought in


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


def user_sources(spec: str, what: str, error: type[InputError] = InputError) -> dict[Path, str]:
    """The user source files (path -> sha256) that importing `spec`'s module brought in, itself included."""
    load_callable(spec, what, error)
    location, _ = split_callable(spec)
    name = _file_module_name(Path(location)) if location.endswith(".py") else location
    if name not in _IMPORTED:  # imported before quantcli looked (by the caller's own code): its own file at least
        _record(name, set(sys.modules) - {name})
    return {Path(path): digest for path, digest in _IMPORTED[name].files.items()}


def _file_module_name(path: Path) -> str:
    return "quantcli_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]


def _import_file(location: str, what: str, error: type[InputError]) -> Any:
    path = Path(location)
    if not path.is_file():
        raise error(f"{what}: file not found: {path}")
    name = _file_module_name(path)
    if _cached(name):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    before = set(sys.modules)
    sys.modules[name] = module  # before running it, as importlib does: dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise error(f"{what}: cannot import {path}: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent))
    _record(name, before)
    return module


def _import_module(location: str, what: str, error: type[InputError]) -> Any:
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    if _cached(location):
        return sys.modules[location]
    before = set(sys.modules)
    try:
        module = importlib.import_module(location)
    except Exception as exc:
        raise error(f"{what}: cannot import {location}: {type(exc).__name__}: {exc}") from exc
    if location not in before:
        _record(location, before)
    return module


def _cached(name: str) -> bool:
    """Whether `name` is imported and its user files are unchanged; if they changed, forget its modules."""
    if name not in sys.modules:
        return False
    imported = _IMPORTED.get(name)
    if imported is None or imported.fresh():
        return True
    for module in imported.modules:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()
    return False


def _record(name: str, before: set[str]) -> None:
    files = {m: path for m in sorted(set(sys.modules) - before) if (path := _user_file(m)) is not None}
    modules = tuple(sorted({name, *files}))  # only user modules are ever forgotten, never a library's
    _IMPORTED[name] = Imported(modules, {str(path): _sha256(path) for path in sorted(set(files.values()))})


def _user_file(name: str) -> Path | None:
    """The source file of module `name` when it is user code: not in the standard library, an installed
    distribution or quantcli itself."""
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if not file or name in ("__main__", "__mp_main__") or name.partition(".")[0] in _installed_names():
        return None  # multiprocessing's import aliases the main script as __mp_main__
    path = Path(file).resolve()
    if path.suffix not in importlib.machinery.all_suffixes() or not path.is_file():
        return None
    return None if any(path.is_relative_to(root) for root in _installed_roots()) else path


@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    roots = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    roots += site.getsitepackages() + [site.getusersitepackages()]
    roots.append(str(Path(__file__).resolve().parents[1]))  # quantcli, whose version is in every key
    return tuple(Path(r).resolve() for r in roots)


@functools.lru_cache(maxsize=1)
def _installed_names() -> frozenset[str]:
    """Top-level module names that belong to an installed distribution (one installed --target too)."""
    return frozenset(metadata.packages_distributions())


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unreadable"
