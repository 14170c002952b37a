"""Build the user's nn.Module from the recipe's model section."""

from __future__ import annotations

from typing import Any

from quantcli.errors import ModelError
from quantcli.loading.factory import load_callable
from quantcli.recipe import ModelSection


def build_model(section: ModelSection) -> Any:
    import torch

    factory = load_callable(section.factory, "model.factory", ModelError)
    try:
        model = factory(**section.kwargs)
    except Exception as exc:
        raise ModelError(f"model.factory {section.factory} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ModelError(
            f"model.factory {section.factory} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model.eval()
