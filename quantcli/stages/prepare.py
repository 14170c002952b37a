"""prepare: annotate the captured graph with the recipe's quantizer and insert observers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli import artifacts
from quantcli.errors import RecipeError
from quantcli.quantizers.cpu import describe
from quantcli.stages.base import StageResult, carry_program, produce, recipe_for, restore_prepared, save_state


def weight_only_setting(weights: Any) -> str:
    """The closing line's words for a weight-only model, e.g. "weight-only int4, blocks of 32, symmetric, gptq"."""
    grain = f"blocks of {weights.block_size}" if weights.block_size else "per channel"
    symmetry = "symmetric" if weights.symmetric else "asymmetric"
    return f"weight-only {weights.dtype}, {grain}, {symmetry}, {weights.method}; activations float"


def run(
    src: str | Path, out: str | Path, *, qat: bool = False, recipe_path: str | Path | None = None, force: bool = False
) -> StageResult:
    from quantcli import quantizers

    parent = artifacts.open_artifact(src, ("captured",), "prepare")
    recipe = recipe_for("prepared", parent, recipe_path)
    if qat and recipe.quantization.weight_only:
        raise RecipeError(
            "--qat: weight-only quantization (quantization.activations: none) has no quantization-aware training",
            "prepare without --qat",
        )
    # target_cpu/reduce_range are resolved once, here, and recorded: reruns elsewhere agree.
    recipe = recipe.model_copy(update={"quantization": quantizers.resolve(recipe.quantization)})
    q = recipe.quantization
    target = weight_only_setting(q.weights) if q.weight_only else describe(q.target_cpu, q.reduce_range)

    def body(st: Any) -> dict[str, Any]:
        carry_program(parent, st.tmp)
        manifest = {"qat": qat, "io": parent.manifest["io"], "recipe": recipe.model_dump(mode="json")}
        module = restore_prepared(artifacts.Artifact(st.tmp, {**parent.manifest, **manifest}))
        save_state(module, st.tmp)
        return {"qat": qat, "io": parent.manifest["io"], "target": target}

    result = produce(
        "prepared", Path(out), recipe=recipe, parent=parent, options={"qat": qat}, data={}, force=force, body=body
    )
    result.work = target  # the closing line says what the model is built for and where it is right
    return result
