"""Optional dependencies: which pip install provides each, found without importing it, imported with the hint.

`validate` asks `missing` (importlib.util.find_spec: no import, so it stays instant) and reports a recipe
that needs an extra which is not installed; the loaders import through `require`, which raises the same
hint when the module is absent. A module that is installed but fails to import is not "missing": its own
error propagates (a torchvision built for another torch is diagnosed where it is imported).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from quantcli.errors import InputError

# module -> the pip install that provides it (the extras are declared in pyproject.toml)
INSTALL: dict[str, str] = {
    "transformers": 'pip install "quantcli[huggingface]"',
    "datasets": 'pip install "quantcli[files]"',
    "PIL": 'pip install "quantcli[files]"',
    "pyarrow": 'pip install "quantcli[files]"',
    "timm": "pip install timm",
}
PACKAGE = {"PIL": "Pillow"}  # distribution names that differ from the module's


def missing(module: str) -> bool:
    """Whether `module` cannot be found (not imported; a broken install counts as found)."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def problem(module: str, needed_by: str) -> str | None:
    """`<needed_by> needs <package>, which is not installed (<pip install>)`, or None when it is."""
    if not missing(module):
        return None
    return f"{needed_by} needs {PACKAGE.get(module, module)}, which is not installed ({INSTALL[module]})"


def require(module: str, needed_by: str, error: type[InputError] = InputError, hint: str | None = None) -> ModuleType:
    """Import `module`, or raise `error` naming what needs it and the install that provides it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        root = module.split(".")[0]
        if exc.name not in (root, module):
            raise  # the module is there but one of its own imports is not: its error says which
        raise error(
            f"{needed_by} needs {PACKAGE.get(root, root)}, which is not installed", hint or INSTALL[root]
        ) from None
