"""Which setting applies to a graph node: exclude lists and overrides over nn_module_stack.

A name glob matches a module path (fnmatch, e.g. "layer2.*", "encoder.layers.?.output") and
applies to every node inside that module, its children included. exclude_types names module
classes (e.g. LayerNorm, BertSelfAttention). The overrides matching a node merge field by field,
in recipe order: for each of `weights`, `activations`, `observer` and `reduce_range`, the last
matching override that sets it wins, and a field no matching override sets comes from the
section; `exclude: true` in any matching override keeps the node in float. (`weights:` and
`activations:` are one field each: an override naming one gives all of its keys, its defaults
for the keys it leaves out.) So an override appended for one module changes only the fields it
names. A glob or type that matches nothing in the graph is an error, not a silent no-op.
"""

from __future__ import annotations

import difflib
from fnmatch import fnmatchcase
from typing import Any

from quantcli.errors import RecipeError
from quantcli.quantizers.specs import Setting
from quantcli.recipe import OverrideConfig, QuantizationSection, WeightsConfig

OVERRIDE_FIELDS = ("weights", "activations", "observer", "reduce_range")


def module_scope(node) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(module paths, module class names) enclosing a node, outermost first, root omitted."""
    stack = node.meta.get("nn_module_stack") or {}
    paths, types = [], []
    for path, mtype in stack.values():
        if not path:
            continue
        paths.append(path)
        name = mtype if isinstance(mtype, str) else getattr(mtype, "__qualname__", str(mtype))
        types.append(name.rsplit(".", 1)[-1])
    return tuple(paths), tuple(types)


def _matches(globs: list[str], paths: tuple[str, ...]) -> bool:
    return any(fnmatchcase(p, g) for g in globs for p in paths)


class Policy:
    """Maps a node to its Setting, or None where the node must stay in float."""

    def __init__(self, q: QuantizationSection, *, qat: bool):
        self.q = q
        self.qat = qat
        self._cache: dict[tuple, Setting | None] = {}

    def setting(self, node) -> Setting | None:
        key = module_scope(node)
        if key not in self._cache:
            self._cache[key] = self._resolve(*key)
        return self._cache[key]

    def _resolve(self, paths: tuple[str, ...], types: tuple[str, ...]) -> Setting | None:
        q = self.q
        merged = applying(q, paths, types)
        if merged is None:
            return None
        weights, acts = merged.get("weights", q.weights), merged.get("activations", q.activations)
        observer, reduce_range = merged.get("observer", q.observer), merged.get("reduce_range", q.reduce_range)
        return Setting(
            act_dtype=acts.dtype,
            act_symmetric=acts.symmetric,
            observer=observer,
            w_per_channel=weights.granularity == "per_channel",
            w_symmetric=weights.symmetric,
            reduce_range=reduce_range if isinstance(reduce_range, str) else bool(reduce_range),
            qat=self.qat,
        )


def applying(q: QuantizationSection, paths: tuple[str, ...], types: tuple[str, ...]) -> dict[str, Any] | None:
    """The override fields that apply inside these modules (module_scope), merged; None where they stay float."""
    if _matches(q.exclude_names, paths) or set(q.exclude_types) & set(types):
        return None
    merged = merge_overrides([o for o in q.overrides if _matches(o.names, paths)])
    return None if merged.get("exclude") else merged


def weights_of(q: QuantizationSection, node) -> WeightsConfig | None:
    """The weights setting of a node (weight-only quantization reads no other), None where it stays float."""
    merged = applying(q, *module_scope(node))
    return None if merged is None else merged.get("weights", q.weights)


def merge_overrides(matching: list[OverrideConfig]) -> dict[str, Any]:
    """The fields the `matching` overrides set, merged in order: the last that sets a field wins."""
    merged: dict[str, Any] = {}
    for o in matching:
        merged.update({f: getattr(o, f) for f in OVERRIDE_FIELDS if getattr(o, f) is not None})
        if o.exclude:
            merged["exclude"] = True
    return merged


def setting_of_module(q: QuantizationSection, graph, module: str, *, qat: bool = False) -> Setting | None:
    """The Setting of the nodes directly inside `module` (a named_modules() path), as the quantizer
    resolves them; None when it stays in float or no node of `graph` is inside it."""
    policy = Policy(q, qat=qat)
    for node in graph.nodes:
        paths, _ = module_scope(node)
        if paths and paths[-1] == module:
            return policy.setting(node)
    return None


def check_matches(q: QuantizationSection, graph) -> None:
    """Raise RecipeError for an exclude/override entry that matches no module of the graph."""
    paths, types = set(), set()
    for node in graph.nodes:
        p, t = module_scope(node)
        paths.update(p)
        types.update(t)
    problems = [
        f"quantization.exclude_names[{i}] {g!r}{_hint(g, paths)}"
        for i, g in enumerate(q.exclude_names)
        if not _matches([g], tuple(paths))
    ]
    problems += [
        f"quantization.exclude_types[{i}] {t!r}{_hint(t, types)}"
        for i, t in enumerate(q.exclude_types)
        if t not in types
    ]
    problems += [
        f"quantization.overrides[{i}].names[{j}] {g!r}{_hint(g, paths)}"
        for i, o in enumerate(q.overrides)
        for j, g in enumerate(o.names)
        if not _matches([g], tuple(paths))
    ]
    if problems:
        raise RecipeError(
            "matches no module of the model: " + "; ".join(problems),
            "module names are the model's named_modules() paths, e.g. 'layer1.0.conv1'",
        )


def _hint(word: str, valid: set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
