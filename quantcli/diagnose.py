"""Capture failures in one line that points at the cause.

torch.export's messages are long (a guard, debugging advice, a link, a graph dump) and churn
between releases. The common failures are classified here on this toolchain's messages and
turned into one line naming the cause and the fix in recipe or model terms; torch's own message
stays in the chained exception, which --debug prints.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from quantcli.errors import ModelError, QuantCliError, RecipeError
from quantcli.recipe import InputSpec

INPUTS_HINT = "check the recipe's inputs (names, shapes, dtypes, dynamic_axes) against forward()"
DEBUG = "--debug shows torch's message"


def signature_problem(forward: Any, inputs: list[InputSpec]) -> str | None:
    """Why forward() cannot take the recipe's inputs positionally, in order (quantcli's calling
    convention, and torch.export's), or None."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None  # a builtin or C++ forward: let the call speak
    kinds = inspect.Parameter
    required_kw = [p.name for p in params if p.kind == kinds.KEYWORD_ONLY and p.default is p.empty]
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional if p.default is p.empty]
    varargs = any(p.kind == kinds.VAR_POSITIONAL for p in params)
    names = [i.name for i in inputs]
    if required_kw:
        return (
            f"forward() takes keyword-only argument(s) {', '.join(map(repr, required_kw))}, but quantcli "
            f"passes the recipe's inputs ({', '.join(names)}) positionally, in order"
        )
    if len(names) < len(required):
        return (
            f"forward() requires {len(required)} positional arguments ({', '.join(required)}), "
            f"but the recipe declares {len(names)} input(s) ({', '.join(names)})"
        )
    if len(names) > len(positional) and not varargs:
        return (
            f"forward() takes {len(positional)} positional argument(s)"
            f"{' (' + ', '.join(p.name for p in positional) + ')' if positional else ''}, "
            f"but the recipe declares {len(names)} input(s) ({', '.join(names)})"
        )
    return None


def check_signature(model: Any, inputs: list[InputSpec]) -> None:
    problem = signature_problem(model.forward, inputs)
    if problem is not None:
        raise ModelError(
            f"capture failed: {problem}",
            "give forward() one positional parameter per recipe input, or wrap the model in a "
            "module whose forward(self, x) calls it with keywords",
        )


def capture_error(exc: BaseException, kind: str | None, inputs: list[InputSpec]) -> QuantCliError:
    """The one-line error for a failed capture; `kind` is `_torch.export_failure(exc)`."""
    message = str(exc)
    if kind == "data_dependent":
        return ModelError(
            f"capture failed: {_control_flow(message)}",
            "torch.export records one graph for every input: use torch.cond for a branch on "
            f"tensor values, or a static alternative such as torch.where; {DEBUG}",
        )
    if kind == "constraints":
        return _constraints(message, inputs)
    first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return ModelError(f"capture failed: {type(exc).__name__}: {first}", INPUTS_HINT)


# `The following call raised this error:\n  File "/x/model.py", line 9, in forward\n    if x.sum() > 0:`
_USER_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.+)')


def _control_flow(message: str) -> str:
    """Where forward() branches on tensor values, as torch reports the user's line."""
    tail = message.split("The following call raised this error:", 1)[-1]
    frames = _USER_FRAME.findall(tail)
    if not frames:
        return (
            "forward() has control flow that depends on tensor values (data-dependent), which torch.export "
            "cannot capture"
        )
    path, line, function, code = frames[-1]
    return (
        f"{function}() at {path}:{line} depends on tensor values (`{code.strip()}`), which torch.export cannot capture"
    )


_DIM = re.compile(r"^(\w+) = Dim\('(\w+)'((?:, (?:min|max)=\d+)*)\)$")
_STATIC = re.compile(r"^(\w+) = (\d+)$")
_SAME = re.compile(r"^(\w+) = (\w+)$")


def _constraints(message: str, inputs: list[InputSpec]) -> RecipeError:
    """A dynamic axis the model does not accept at every size, with torch's suggested fix in recipe terms."""
    fixes = _suggested_fixes(message)
    symbol = re.search(r"Constraints violated \(([^)]*)\)", message)
    names = [s.strip() for s in symbol.group(1).split(",")] if symbol else []
    head = (
        f"capture failed: the model does not accept every size of dynamic axis "
        f"{', '.join(map(repr, names)) or '?'} ({_axes_of(names, inputs)})"
    )
    if not fixes:
        return RecipeError(head, f"bound or remove that dynamic axis in the recipe; {DEBUG}")
    return RecipeError(f"{head}: torch suggests {'; '.join(fixes)}", "; ".join(_recipe_fix(f, inputs) for f in fixes))


def _suggested_fixes(message: str) -> list[str]:
    """The lines under torch's "Suggested fixes:" that quantcli can translate."""
    if "Suggested fixes:" not in message:
        return []
    lines = [line.strip() for line in message.split("Suggested fixes:", 1)[1].splitlines()]
    return [line for line in lines if _DIM.match(line) or _STATIC.match(line) or _SAME.match(line)]


def _uses(symbol: str, inputs: list[InputSpec]) -> list[tuple[str, int]]:
    return [(spec.name, axis) for spec in inputs for axis, name in spec.axes().items() if name == symbol]


def _axes_of(symbols: list[str], inputs: list[InputSpec]) -> str:
    """Where the recipe uses the symbols: "input_ids axis 1, attention_mask axis 1"."""
    found = [f"{name} axis {axis}" for symbol in symbols for name, axis in _uses(symbol, inputs)]
    return ", ".join(found) or "see the recipe's dynamic_axes"


def _recipe_fix(fix: str, inputs: list[InputSpec]) -> str:
    """torch's suggested fix (`seq = Dim('seq', max=64)`, `batch = 4`, `other = batch`) as a recipe edit."""
    match = _DIM.match(fix)
    if match:
        symbol, name, bounds = match.groups()
        fields = ", ".join([f"name: {name}"] + [b.strip().replace("=", ": ") for b in bounds.split(",") if b.strip()])
        where = ", ".join(f"{input_name} {{{axis}: {{{fields}}}}}" for input_name, axis in _uses(symbol, inputs))
        return f"bound it in the recipe's dynamic_axes: {where or '{AXIS: {' + fields + '}}'}"
    match = _STATIC.match(fix)
    if match:
        return (
            f"the model fixes {match.group(1)} to {match.group(2)}: make {_axes_of([match.group(1)], inputs)} "
            "static (drop it from dynamic_axes)"
        )
    symbol, other = _SAME.match(fix).groups()
    return f"{symbol} must equal {other}: name {_axes_of([symbol], inputs)} {other!r} in dynamic_axes"
