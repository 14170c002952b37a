"""What building a model from the recipe gives capture, whatever its source (sources.build dispatches)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quantcli.recipe import Recipe


@dataclass
class Built:
    """A model ready to capture, the recipe it was resolved into, and a fallback to try if capture fails."""

    module: Any  # torch.nn.Module in eval mode
    recipe: Recipe  # inputs (and image preprocessing) resolved
    fallback: Recipe | None = None  # the same with the sequence axis static, for models that specialize it
    outputs: list[str] | None = None  # the output names the source gives when the recipe names none
    details: dict[str, Any] = field(default_factory=dict)  # what the source resolved, for the manifest
