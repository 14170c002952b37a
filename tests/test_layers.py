"""Layers that point one way: no import cycle in quantcli/, and a recipe schema at the bottom.

Imports are read from the source with ast (every import statement, function-level and TYPE_CHECKING
ones included), so a cycle hidden behind a lazy import counts too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "quantcli"

# What the schema may import: errors, file references and the torch-free name registries beside their owners.
SCHEMA_IMPORTS = {
    "quantcli.errors",
    "quantcli.references",
    "quantcli.loading.kinds",
    "quantcli.loading.dtypes",  # data kinds by file name; input dtypes by name
    "quantcli.quantizers.names",
    "quantcli.sources.names",
    "quantcli.numerics.names",
    "quantcli.training.names",
}


def _modules() -> dict[str, Path]:
    return {
        ".".join(("quantcli", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The quantcli modules `path` imports: `from a.b import c` is a.b.c where that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantcli"):
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("quantcli"))
    return found & set(modules)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_quantcli_has_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_schema_imports_only_errors_references_and_name_registries():
    modules = _modules()
    assert _imports(modules["quantcli.recipe"], modules) <= SCHEMA_IMPORTS
    for name in SCHEMA_IMPORTS:  # and they stay at the bottom: nothing but each other
        assert _imports(modules[name], modules) <= SCHEMA_IMPORTS, name


def test_importing_the_schema_imports_no_numpy_or_torch():
    probe = (
        "import json, sys; import quantcli.recipe; "
        "print(json.dumps(sorted(m for m in ('numpy', 'torch', 'torchao', 'onnx') if m in sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert json.loads(proc.stdout) == [], proc.stderr
