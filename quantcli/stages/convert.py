"""convert: turn observers into quantize/dequantize ops (convert_pt2e) and save a new program."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli import artifacts, staging
from quantcli.errors import ModelError
from quantcli.loading.data import to_tensors
from quantcli.loading.inputs import dynamic_shapes, export_example
from quantcli.stages.base import StageResult, produce, recipe_of, restore_prepared


def count_ops(module: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in module.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def run(
    src: str | Path,
    out: str | Path,
    *,
    fold_quantize: bool = True,
    reference_representation: bool = False,
    force: bool = False,
) -> StageResult:
    parent = artifacts.open_artifact(src, ("calibrated", "trained"), "convert")
    recipe = recipe_of(parent)
    options = {"fold_quantize": fold_quantize, "reference_representation": reference_representation}

    def body(st: Any) -> dict[str, Any]:
        from quantcli import _torch

        captured = _torch.load_program(parent.file(artifacts.PROGRAM))  # also the lift's template: loaded once
        module = _torch.to_eval(restore_prepared(parent, captured=captured))
        if recipe.quantization.weight_only:
            extra = _weight_only(module, recipe, st.tmp)
        else:
            from quantcli.quantizers import pair_safety

            module = _torch.convert(module, fold_quantize, reference_representation)
            extra = {"pair_safe_weights_lowered": pair_safety.enforce(module, recipe.quantization)}
        _torch.prune_unused(module)
        program = lifted = _torch.lifted(module, captured)
        if program is None:  # a graph the lift leaves to torch.export
            args = to_tensors(export_example(recipe.inputs), recipe.inputs)
            try:
                program = _torch.export_program(module, args, dynamic_shapes(recipe.inputs))
            except Exception as exc:
                raise ModelError(f"cannot re-export the converted model: {type(exc).__name__}: {exc}") from exc
        _torch.save_program(program, st.tmp / artifacts.PROGRAM)
        if lifted is not None:  # export in this process reads it without a load (the folder is renamed, not copied)
            _torch.keep_as_loaded(program, st.tmp / artifacts.PROGRAM)  # only read below
        staging.link_or_copy(parent.file(artifacts.PROGRAM), st.tmp / artifacts.FLOAT_PROGRAM)
        staging.link_or_copy(parent.file(artifacts.STATE), st.tmp / artifacts.STATE)  # the calibrated state, for report
        return {
            "qat": parent.manifest["qat"],
            "io": parent.manifest["io"],
            "observers_frozen": bool(parent.manifest.get("observers_frozen")),
            "bias_correction": parent.manifest.get("bias_correction", {}),
            "ops": count_ops(program.graph_module),
            **extra,
        }

    return produce(
        "converted", Path(out), recipe=recipe, parent=parent, options=options, data={}, force=force, body=body
    )


def _weight_only(module: Any, recipe: Any, folder: Path) -> dict[str, Any]:
    """Quantize the module's linears in place (quantcli.weightonly.apply); write their codes; the manifest entry."""
    from quantcli import _torch
    from quantcli.weightonly import apply

    records, codes = apply.convert(module, recipe.quantization)
    _torch.save_state(codes, folder / artifacts.WEIGHT_CODES)
    return {"weight_only": records}
