"""Importing user factories ("file.py:callable") the way Python imports modules."""

from __future__ import annotations

import pytest

from quantcli.errors import ModelError
from quantcli.loading.factory import load_callable


def test_a_factory_file_may_define_dataclasses(tmp_path):
    """dataclasses look their class's module up in sys.modules while the file runs (tests/zoo.py has one)."""
    path = tmp_path / "factory.py"
    path.write_text(
        "from __future__ import annotations\nfrom dataclasses import dataclass\n\n"
        "@dataclass(frozen=True)\nclass Spec:\n    width: int\n\n"
        "def build(width: int = 3):\n    return Spec(width)\n"
    )
    assert load_callable(f"{path}:build", "model.factory")(width=5).width == 5


def test_a_factory_file_that_fails_is_not_half_registered(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise ValueError('boom')\n")
    for _ in range(2):  # the second import runs the file again instead of returning a broken module
        with pytest.raises(ModelError, match="ValueError: boom"):
            load_callable(f"{path}:build", "model.factory", ModelError)
