"""A recipe that needs an optional package which is not installed: `validate` says so as a problem of the
recipe (exit 2) naming the pip install that provides it, and the loaders raise the same hint.

A package is made missing the way Python itself reports one: `sys.modules[name] = None`, which makes
`importlib.util.find_spec` answer None and `import` raise ModuleNotFoundError.
"""

from __future__ import annotations

import sys

import pytest

from quantcli import errors, extras, pipeline
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"
FILES = 'pip install "quantcli[files]"'
HUGGINGFACE = 'pip install "quantcli[huggingface]"'


def _validate_error(recipe) -> errors.QuantCliError:
    with pytest.raises(errors.QuantCliError) as info:
        pipeline.validate(recipe)
    return info.value


@pytest.mark.parametrize(
    "recipe, hidden, expected",
    [
        (
            "sentiment/recipe.yaml",
            "datasets",
            [
                f"calibration.data (train.txt) needs datasets, which is not installed ({FILES})",
                f"evaluation.data (dev.csv) needs datasets, which is not installed ({FILES})",
            ],
        ),
        (
            "sentiment/recipe.yaml",
            "transformers",
            [f"model.huggingface needs transformers, which is not installed ({HUGGINGFACE})"],
        ),
        (
            "photos/hf.yaml",
            "PIL",
            [
                f"model.huggingface (image-classification) needs Pillow, which is not installed ({FILES})",
                f"calibration.data (an image folder) needs Pillow, which is not installed ({FILES})",
                f"evaluation.data (an image folder) needs Pillow, which is not installed ({FILES})",
            ],
        ),
    ],
)
def test_a_missing_extra_is_a_recipe_problem_naming_the_install(monkeypatch, recipe, hidden, expected):
    assert pipeline.validate(CONFIGS / recipe)["valid"]  # installed: valid
    monkeypatch.setitem(sys.modules, hidden, None)
    error = _validate_error(CONFIGS / recipe)
    assert (type(error), error.exit_code) == (errors.RecipeError, 2)
    assert error.message.split(": ", 1)[1] == f"{len(expected)} problem(s): " + "; ".join(expected)


def test_a_recipe_of_arrays_needs_no_extra(monkeypatch):
    for hidden in ("datasets", "transformers", "PIL", "pyarrow"):
        monkeypatch.setitem(sys.modules, hidden, None)
    assert pipeline.validate(CONFIGS / "digits" / "recipe.yaml")["valid"]


def test_the_loaders_raise_the_same_install_hint(monkeypatch):
    from quantcli.loading import files

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(errors.DataError) as info:
        next(files.table_rows(CONFIGS / "sentiment" / "data" / "train.txt", "calibration"))
    assert info.value.line() == f"reading text and table files needs datasets, which is not installed ({FILES})"


def test_require_lets_a_broken_install_speak_for_itself(tmp_path, monkeypatch):
    """A module that is there but fails on one of its own imports is not reported as missing."""
    (tmp_path / "brokenpkg.py").write_text("import no_such_dependency_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(extras.INSTALL, "brokenpkg", "pip install brokenpkg")
    assert not extras.missing("brokenpkg")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_here"):
        extras.require("brokenpkg", "a test")
