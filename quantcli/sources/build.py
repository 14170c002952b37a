"""Build the model from the recipe's model section: one dispatch by source (factory, Hugging Face, zoo).

Every builder returns the module and the recipe with what the source knows resolved (inputs, a zoo
model's image preprocessing), which capture records so that later stages read it from the artifact.
"""

from __future__ import annotations

from collections.abc import Callable

from quantcli.errors import ModelError
from quantcli.loading.factory import load_callable
from quantcli.recipe import Recipe
from quantcli.sources.base import Built


def _factory(recipe: Recipe) -> Built:
    import torch

    section = recipe.model
    factory = load_callable(section.factory, "model.factory", ModelError)
    try:
        model = factory(**section.kwargs)
    except Exception as exc:
        raise ModelError(f"model.factory {section.factory} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model.factory {section.factory} returned {type(model).__name__}, not a torch.nn.Module")
    return Built(model.eval(), recipe)


def _huggingface(recipe: Recipe) -> Built:
    from quantcli.sources import huggingface

    return huggingface.build(recipe)


def _torchvision(recipe: Recipe) -> Built:
    from quantcli.sources import zoo

    return zoo.build(recipe, zoo.TORCHVISION)


def _timm(recipe: Recipe) -> Built:
    from quantcli.sources import zoo

    return zoo.build(recipe, zoo.TIMM)


BUILDERS: dict[str, Callable[[Recipe], Built]] = {
    "factory": _factory,
    "huggingface": _huggingface,
    "torchvision": _torchvision,
    "timm": _timm,
}


def build_model(recipe: Recipe) -> Built:
    """The recipe's model by its source (sources.names.SOURCES; a test checks both lists agree)."""
    return BUILDERS[recipe.model.source](recipe)
