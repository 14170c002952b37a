"""The onnxruntime quantizer's configuration as plain values, for use without a recipe or the CLI.

    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from quantcli import quantizers

    quantizer = quantizers.build(quantizers.QuantizerConfig(observer="percentile", exclude_names=("head.*",)))
    prepared = prepare_pt2e(torch.export.export(model, args).module(), quantizer)

The fields are the recipe's `quantization:` keys (docs/recipe.md), flattened. `section()` turns them into
that section through the schema, which checks every value; `quantizers.build` resolves its "auto" CPU
settings for this machine, as prepare does for a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantcli.errors import RecipeError


@dataclass(frozen=True)
class QuantizerConfig:
    weights_granularity: str = "per_channel"  # or per_tensor
    weights_symmetric: bool = True
    activations_dtype: str = "uint8"  # or int8
    activations_symmetric: bool = False
    observer: str = "auto"  # quantizers.names.OBSERVERS
    target_cpu: str = "auto"  # auto | avx2 | avx512 | vnni | arm64
    reduce_range: bool | str = "auto"
    equalize: bool = True
    exclude_names: tuple[str, ...] = ()  # module-name globs kept in float
    exclude_types: tuple[str, ...] = ()  # module class names kept in float
    overrides: tuple[dict[str, Any], ...] = ()  # {"names": [...], "observer": ..., "exclude": True, ...}

    def section(self) -> Any:
        """The `quantization:` section these values make (a RecipeError names a bad value's key)."""
        from pydantic import ValidationError

        from quantcli.recipe import QuantizationSection, format_errors

        document = {
            "target": "onnxruntime",
            "weights": {"granularity": self.weights_granularity, "symmetric": self.weights_symmetric},
            "activations": {"dtype": self.activations_dtype, "symmetric": self.activations_symmetric},
            "observer": self.observer,
            "target_cpu": self.target_cpu,
            "reduce_range": self.reduce_range,
            "equalize": self.equalize,
            "exclude_names": list(self.exclude_names),
            "exclude_types": list(self.exclude_types),
            "overrides": [dict(o) for o in self.overrides],
        }
        try:
            return QuantizationSection.model_validate(document)
        except ValidationError as exc:
            raise RecipeError("QuantizerConfig: " + "; ".join(format_errors(exc, QuantizationSection))) from None
