"""Property-based: whatever the recipe file holds, `quantcli validate` answers with a documented exit
code, one error line (or one JSON document) and never a traceback.

`validate` runs in-process through the console script's `main` (it imports no torch, so this is the
same code path as the real command, minus the process start); test_bad_input.py covers the process.

Each test draws 40 examples: the four take 5 s alone, about 10 s inside the whole suite on two busy cores.
To search deeper, raise FUZZ_EXAMPLES: `FUZZ_EXAMPLES=1000 python -m pytest tests/test_validate_fuzz.py`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantcli.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits"
BASE = yaml.safe_load((DIGITS / "recipe.yaml").read_text())
BASE["model"]["factory"] = f"{DIGITS / 'model.py'}:build"
BASE["calibration"]["data"] = BASE["evaluation"]["data"] = str(DIGITS / "digits.npz")
SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def validate(path: Path, *flags: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `quantcli validate PATH FLAGS`, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(["validate", str(path), *flags])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return code, out.getvalue(), err.getvalue()


def check_answer(path: Path) -> tuple[int, dict[str, Any]]:
    """Run validate with and without --json; assert the contract; return (code, JSON document)."""
    code, stdout, stderr = validate(path, "--json")
    assert "Traceback" not in stderr and code in (0, 2, 3), (code, stderr)
    doc = json.loads(stdout)  # exactly one JSON document
    if code == 0:
        assert doc["valid"] is True and stderr == ""
    else:
        assert doc["error"]["code"] == code and doc["error"]["kind"] in ("recipe", "input")
        assert stderr == f"error: {doc['error']['message']}\n"  # one line, the same message
    plain_code, plain_out, plain_err = validate(path)
    assert plain_code == code and "Traceback" not in plain_err
    assert len(plain_err.splitlines()) == 1  # "checked N file(s)" or the error line
    return code, doc


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12))
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), inner, max_size=4)
    ),
    max_leaves=20,
)


@SETTINGS
@given(doc=documents)
@pytest.mark.slow
def test_random_yaml_documents(tmp_path, doc):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    check_answer(path)


@SETTINGS
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
@pytest.mark.slow
def test_random_text(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    check_answer(path)


@SETTINGS
@given(data=st.binary(max_size=100))
@pytest.mark.slow
def test_random_bytes(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    check_answer(path)


path_strings = st.one_of(
    st.text(max_size=20),
    st.text(alphabet="\x00/:.~ab", max_size=12),
    st.sampled_from(
        [
            "",
            ".",
            "/",
            "..",
            "~",
            "a" * 300,
            "/dev/null",
            "/proc/self",
            str(DIGITS),
            "digits.npz:",
            ":build",
            "a.py:",
            "pkg.mod:fn",
        ]
    ),
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a nested dict/list document."""
    found = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found += _paths(value, prefix + (index,))
    return found


def _parent(doc: Any, path: tuple) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


@st.composite
def mutated_recipes(draw: st.DrawFn) -> tuple[dict, str, tuple]:
    """The valid digits recipe with one change: a value replaced, a key removed, renamed or added."""
    doc = copy.deepcopy(BASE)
    path = draw(st.sampled_from(_paths(doc)))
    kind = draw(st.sampled_from(["replace", "remove", "rename", "add", "path"]))
    if kind == "path":  # a file reference the OS may refuse: NUL, too long, a folder, odd characters
        path = draw(st.sampled_from([("model", "factory"), ("calibration", "data"), ("evaluation", "data")]))
    parent, last = _parent(doc, path), path[-1]
    if kind == "path":
        parent[last] = draw(st.one_of(path_strings, path_strings.map(lambda p: p + ".py:build")))
    elif kind == "replace":
        parent[last] = draw(documents)
    elif kind == "remove":
        del parent[last]
    elif kind == "rename" and isinstance(last, str):
        parent[last + draw(st.sampled_from(["_", "s", "x"]))] = parent.pop(last)
    elif kind == "add" and isinstance(parent, dict):
        parent["zz_" + draw(st.text(alphabet="abcdefgh", min_size=1, max_size=6))] = draw(scalars)
    else:
        kind = "none"
    return doc, kind, path


@SETTINGS
@given(case=mutated_recipes())
@pytest.mark.slow
def test_one_change_to_a_valid_recipe(tmp_path, case):
    doc, kind, path = case
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    code, answer = check_answer(recipe)
    free_form = any(part in ("kwargs", "keys") for part in path[:-1])  # user-named keys
    if kind in ("rename", "add") and not free_form:  # an unknown key is an error naming its dotted path
        assert code == 2
        assert ": unknown key" in answer["error"]["message"]
        dotted = ".".join(str(p) for p in path[:-1])
        assert dotted in answer["error"]["message"]
