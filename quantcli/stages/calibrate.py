"""calibrate: feed calibration batches through the prepared model so observers collect ranges."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantcli import artifacts, staging
from quantcli.errors import DataError, QuantCliError, RecipeError
from quantcli.loading.data import BatchDigest, is_callable_source, iter_batches, samples_in, to_tensors
from quantcli.loading.headers import check_sources
from quantcli.recipe import CalibrationSection, Recipe
from quantcli.stages.base import (
    Progress,
    StageResult,
    callable_digest,
    carry_program,
    data_hashes,
    no_progress,
    produce,
    recipe_for,
    restore_prepared,
    save_state,
)

log = logging.getLogger("quantcli")


def with_overrides(recipe: Recipe, data: str | None, batches: int | None) -> CalibrationSection:
    """The calibration section after --data and --batches are applied."""
    section = recipe.calibration
    if section is None and data is None:
        raise RecipeError("calibration.data is not set", "pass --data FILE.npz or add a calibration: section")
    section = section or CalibrationSection(data=str(Path(data).resolve()))
    update: dict[str, Any] = {}
    if data is not None:
        update["data"] = str(Path(data).resolve()) if Path(data).exists() else data
    if batches is not None:
        update["num_batches"] = batches
    return section.model_copy(update=update)


def run_batches(
    module: Any,
    recipe: Recipe,
    progress: Progress,
    digest: BatchDigest | None = None,
    call: Callable[[int, tuple], Any] | None = None,
) -> tuple[int, int]:
    """Feed the calibration batches through `module` (adding each to `digest`; each batch as `call(index, args)`
    where given, which runs `module`); (batches, samples) seen."""
    from quantcli import _torch
    from quantcli.loading.files import reader

    section, inputs = recipe.calibration, recipe.inputs
    total, batches = iter_batches(
        section.data,
        section.keys,
        inputs,
        section.batch_size,
        section.num_batches,
        "calibration",
        files=reader(recipe, "calibration"),
    )
    seen = samples = 0
    axes = _torch.input_axes(module)
    step = call if call is not None else (lambda index, args: module(*args))
    with _torch.torch.no_grad():
        for index, batch in enumerate(batches):
            args = to_tensors(batch, inputs)
            check_fits(args, axes, inputs, index)
            forward(functools.partial(step, index, args), index)
            if digest is not None:
                digest.add(batch)
            seen += 1
            samples += samples_in(batch)
            progress(seen, total or None, {})
    if seen == 0:
        raise DataError("calibration: the data yielded no batches")
    return seen, samples


def check_fits(args: tuple, axes: list[tuple[list[Any], Any]], inputs: list[Any], index: int) -> None:
    """A DataError when a batch's rank, dtype or a dimension does not fit the captured program's inputs."""
    for tensor, spec, (want, dtype) in zip(args, inputs, axes):
        shape = list(tensor.shape)
        problem = None
        if tensor.dtype != dtype:
            problem = f"is {_dtype(tensor.dtype)}, the captured model takes {_dtype(dtype)}"
        elif len(shape) != len(want) or any(not _fits(n, w) for n, w in zip(shape, want)):
            problem = f"has shape {shape}, the captured model takes {_shown(want)}"
        if problem is not None:
            raise DataError(f"calibration batch {index} does not fit the model: input {spec.name!r} {problem}")


def _dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _fits(size: int, want: int | tuple[int, int | None]) -> bool:
    if isinstance(want, int):
        return size == want
    return size >= want[0] and (want[1] is None or size <= want[1])


def _shown(axes: list[Any]) -> str:
    return (
        "[" + ", ".join(str(a) if isinstance(a, int) else f"{a[0]}..{'' if a[1] is None else a[1]}" for a in axes) + "]"
    )


def forward(run: Callable[[], Any], index: int) -> None:
    """One calibration forward. Only the program's own input checks blame the data; running out of
    memory says so; anything else is what it is (an internal error, with --debug's traceback)."""
    from quantcli import _torch

    try:
        run()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if _torch.is_guard_failure(exc):
            raise DataError(f"calibration batch {index} does not fit the model: {first}") from exc
        if _torch.is_out_of_memory(exc):
            raise QuantCliError(
                f"calibration batch {index} ran out of memory: {first}", "lower calibration.batch_size"
            ) from exc
        raise


def run(
    src: str | Path,
    out: str | Path,
    *,
    data: str | None = None,
    batches: int | None = None,
    recipe_path: str | Path | None = None,
    force: bool = False,
    progress: Progress = no_progress,
) -> StageResult:
    parent = artifacts.open_artifact(src, ("prepared",), "calibrate")
    recipe = recipe_for("calibrated", parent, recipe_path)
    if not recipe.quantization.needs_data:
        return without_data(parent, recipe, Path(out), force)
    section = with_overrides(recipe, data, batches)
    recipe = recipe.model_copy(update={"calibration": section})
    hashes = data_hashes({"calibration.data": section.data})
    check_sources(recipe, ("calibration",))
    streamed = is_callable_source(section.data)
    if streamed:  # keyed by what it yields: a pass over its batches before deciding to reuse
        hashes["calibration.data"] = callable_digest(recipe, "calibration", section.num_batches)

    def body(st: Any) -> dict[str, Any]:
        module = restore_prepared(parent)  # imports torch through quantcli._torch, which silences it

        from quantcli.quantizers import range_choice

        digest = BatchDigest() if streamed else None
        session = range_choice.Session(module, corrects_biases(recipe, parent))
        seen, samples = run_batches(module, recipe, progress, digest, session.forward)
        extra = {"qat": parent.manifest["qat"], "io": parent.manifest["io"], "batches": seen, "samples": samples}
        biases, ranges = session.finish()
        if session.correction is not None:
            extra["bias_correction"] = {"biases": biases, "samples": samples_in(session.correction.args)}
        if ranges is not None:
            extra["ranges"] = ranges
        carry_program(parent, st.tmp)
        save_state(module, st.tmp)
        if recipe.quantization.weight_only:
            from quantcli.weightonly import collect

            extra["collected"] = collect.summary(module)
        if digest is None:
            return extra
        if digest.value() != hashes["calibration.data"]:
            log.warning(
                f"calibration.data: {section.data} yielded other batches when called again; an output "
                "calibrated on it is never reused"
            )
        return {**extra, "data": {**hashes, "calibration.data": digest.value()}}

    result = produce(
        "calibrated", Path(out), recipe=recipe, parent=parent, options={}, data=hashes, force=force, body=body
    )
    result.work = work_done(result.manifest)
    return result


def corrects_biases(recipe: Recipe, parent: artifacts.Artifact) -> bool:
    """Whether calibrate corrects biases: asked for, static activations, not for training (QAT learns them)."""
    q = recipe.quantization
    return (
        recipe.calibration.bias_correction
        and q.target == "onnxruntime"
        and not q.weight_only
        and not parent.manifest["qat"]
    )


def without_data(parent: artifacts.Artifact, recipe: Recipe, out: Path, force: bool) -> StageResult:
    """The calibrated artifact of a weight-only model whose methods collect nothing (RTN): the prepared one's
    program and state, no data read (calibration data, if any, is neither needed nor hashed)."""

    def body(st: Any) -> dict[str, Any]:
        carry_program(parent, st.tmp)
        staging.link_or_copy(parent.file(artifacts.STATE), st.tmp / artifacts.STATE)
        return {"qat": False, "io": parent.manifest["io"], "batches": 0, "samples": 0, "collected": {}}

    result = produce("calibrated", out, recipe=recipe, parent=parent, options={}, data={}, force=force, body=body)
    result.work = "no data needed: round to nearest"
    return result


def work_done(manifest: dict[str, Any]) -> str:
    """ "N batches, M samples" as a calibrated manifest records them ("" for artifacts made before it did)."""
    if "samples" not in manifest:
        return f"{manifest['batches']} batches" if "batches" in manifest else ""
    return f"{manifest['batches']} batches, {manifest['samples']} samples"
