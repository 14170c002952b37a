"""`quantcli report`: where a converted model loses accuracy, layer by layer (quantcli.report.taps).

For every measuring point (a quantized op's output, keyed by its module) it sums, over the data,
the signal and noise powers of: the op's local error and the accumulated error against the fp32
reference, and with an ONNX file, ORT's value against the PyTorch int8 model's and against fp32.
Whole-model figures come from the same pass.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from quantcli import artifacts
from quantcli.errors import ArtifactError, InputError, RecipeError
from quantcli.loading.data import TARGET_COLUMN, iter_batches, to_tensors
from quantcli.recipe import Recipe
from quantcli.report import taps
from quantcli.report.measure import Figures
from quantcli.stages.base import Progress, no_progress, recipe_of, restore_prepared

# The in-process conversion must give the saved program's outputs: float rounding only.
REPRODUCE_MIN_DB = 100.0


def open_converted(src: str | Path) -> artifacts.Artifact:
    art = artifacts.open_artifact(src, ("converted",), "report")
    if artifacts.STATE not in art.manifest["files"]:
        raise ArtifactError(
            f"{src} does not hold the calibrated state report compares against",
            "it was converted by an older quantcli: rerun `quantcli convert ... --force`",
        )
    return art


def data_source(recipe: Recipe, data: str | None, batches: int | None) -> tuple[str, Any, Recipe]:
    """(which section, that section with --data/--batches applied, the recipe holding it)."""
    what = "evaluation" if recipe.evaluation is not None else "calibration"
    section = getattr(recipe, what)
    if section is None:
        if data is None:
            raise InputError("the recipe has no evaluation or calibration data", "pass --data FILE")
        from quantcli.recipe import CalibrationSection

        what, section = "calibration", CalibrationSection(data=data)
    update: dict[str, Any] = {}
    if data is not None:
        if not Path(data).exists() and ":" not in data:
            raise InputError(f"--data {data}: file not found")
        update["data"] = str(Path(data).resolve()) if Path(data).exists() else data
    section = section.model_copy(update=update)
    return what, section, recipe.model_copy(update={what: section})


def modules(art: artifacts.Artifact) -> tuple[Any, Any, Any, Any]:
    """(fp32 reference, in-process int8 copy, its copy for local errors, the saved int8 program's module).

    The copy for local errors keeps the float biases where calibrate corrected them: a corrected bias takes
    back the mean shift of the layers before it too, which local mode replaces with the reference's values.
    """
    from quantcli import _torch

    options = art.manifest["options"]

    def int8(prepared: Any) -> Any:
        return _torch.convert(_torch.to_eval(prepared), options["fold_quantize"], options["reference_representation"])

    floats = restore_prepared(art, artifacts.FLOAT_PROGRAM, float_biases=True)
    converted = int8(restore_prepared(art, artifacts.FLOAT_PROGRAM))
    local = int8(copy.deepcopy(floats)) if art.manifest.get("bias_correction", {}).get("biases") else converted
    saved = _torch.load_program(art.file(artifacts.PROGRAM)).module()
    return taps.float_reference(floats), converted, local, saved


def _onnx(path: str | Path | None, art: artifacts.Artifact) -> Path | None:
    from quantcli.onnx.export import read_metadata

    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--onnx {path}: file not found", f"make it with `quantcli export {art.path} -o {path}`")
    try:
        parent = read_metadata(path).get("parent") or {}
    except Exception as exc:
        raise InputError(f"--onnx {path}: not an ONNX model quantcli can read: {type(exc).__name__}") from exc
    if parent.get("sha256") != art.digest:
        raise ArtifactError(
            f"--onnx {path} was not exported from {art.path}", f"export it with `quantcli export {art.path} -o {path}`"
        )
    return path


def report(
    src: str | Path,
    *,
    onnx: str | Path | None = None,
    data: str | None = None,
    batches: int | None = None,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """The per-layer and whole-model figures of the converted artifact `src` on the recipe's data."""
    from quantcli.loading.files import reader
    from quantcli.report.ort_taps import OrtTaps

    art = open_converted(src)
    if recipe_of(art).quantization.weight_only:
        raise RecipeError(
            f"{src} is weight-only: report's per-layer figures follow static quantization's quantize ops",
            "export's report (model.report.json) has the weight-only model's parity, SQNR, kernels and evaluation",
        )
    onnx_path = _onnx(onnx, art)
    what, section, recipe = data_source(recipe_of(art), data, batches)
    evaluating = what == "evaluation" and data is None  # the recipe's metric on its held-out data
    targets = section.targets if evaluating else None
    total, stream = iter_batches(
        section.data,
        section.keys,
        recipe.inputs,
        section.batch_size,
        batches or getattr(section, "num_batches", None),
        what,
        targets=targets,
        files=reader(recipe, what, targets=targets is not None),
    )
    models = modules(art)
    # QAT's convert folds BN into the convs: those nodes exist in the converted graph only
    known = {n.name for n in models[0].graph.nodes}
    found = [p for p in taps.points(models[1]) if p.node in known]
    figures = Figures(
        found, taps.quantized_inputs(models[1]) & known, art.manifest["io"]["outputs"], recipe if evaluating else None
    )
    ort = OrtTaps(onnx_path, [p.node for p in found], {p.node: p.module for p in found}) if onnx_path else None
    try:
        _measure(models, recipe, stream, figures, ort, lambda i: progress(i, total or None, {}))
    finally:
        if ort is not None:
            ort.close()
    if figures.batches == 0:
        raise InputError(f"{what}: the data yielded no batches")
    doc = figures.result()
    if doc["model"]["saved_vs_copy_db"] < REPRODUCE_MIN_DB:
        raise ArtifactError(
            f"{src}: converting its calibrated state again gives other outputs than its program "
            f"({doc['model']['saved_vs_copy_db']} dB)",
            "rerun `quantcli convert ... --force`",
        )
    doc.update(
        {
            "artifact": str(src),
            "onnx": str(onnx_path) if onnx_path else None,
            "unmatched": [p.node for p in taps.points(models[1]) if p.node not in known],
            "data": {"section": what, "source": section.data, "batches": figures.batches, "samples": figures.samples},
            "sizes": _sizes(art, onnx_path),
        }
    )
    if ort is not None:
        from quantcli.onnx import fusion

        doc["kernels"] = {
            **fusion.analyze(onnx_path),
            "fusions_kept_with_taps": ort.fusions_kept,
            "tapped": len(ort.taps),
            "module_mismatch": ort.module_mismatch,
        }
    return doc


def _measure(
    models: tuple[Any, Any, Any, Any], recipe: Recipe, stream: Any, figures: Figures, ort: Any, progress: Any
) -> None:
    """Each batch through the fp32 reference, the int8 copy (accumulated, then local), the saved
    int8 program and ORT; the figures add them up."""
    from quantcli import _torch

    reference, converted, local_copy, saved = models
    ends = taps.output_points(converted, figures.points)  # float outputs of int8 ops: ORT's graph outputs
    for index, batch in enumerate(stream):
        target = batch.pop(TARGET_COLUMN, None)
        args = to_tensors(batch, recipe.inputs)
        fp32, ref = taps.observe(reference, args, figures.watch)
        int8, acc = taps.observe(converted, args, figures.watch)
        _, local = taps.observe(local_copy, args, figures.watch, substitute=ref)
        with _torch.torch.no_grad():
            shipped = _leaves(saved(*args))
        figures.add_torch(_leaves(fp32), _leaves(int8), shipped, ref, acc, local, target)
        if ort is not None:
            outs, tapped = ort.run(batch)
            tapped.update({node: outs[i] for node, i in ends.items()})
            figures.add_ort(outs, tapped, target)
        progress(index + 1)


def _leaves(out: Any) -> list[np.ndarray]:
    from quantcli import _torch

    return [t.numpy() for _, t in _torch.output_leaves(out)]


def _sizes(art: artifacts.Artifact, onnx_path: Path | None) -> dict[str, int]:
    files = art.manifest["files"]
    sizes = {"fp32_program": files[artifacts.FLOAT_PROGRAM]["size"], "int8_program": files[artifacts.PROGRAM]["size"]}
    if onnx_path is not None:
        sizes["int8_onnx"] = onnx_path.stat().st_size
    return sizes


def run(
    src: str | Path,
    *,
    onnx: str | Path | None = None,
    data: str | None = None,
    batches: int | None = None,
    plot: str | Path | None = None,
    force: bool = False,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """`quantcli report`: the report, and with `plot` its PNG written there (a file quantcli did not write
    there is replaced only with `force`)."""
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise RecipeError(f"--plot {plot}: the plot is a PNG file", "name it FILE.png")
    if plot is not None:
        from quantcli.report.plot import check_path

        check_path(Path(plot), force)
    doc = report(src, onnx=onnx, data=data, batches=batches, progress=progress)
    if plot is not None:
        from quantcli.report.plot import plot as draw

        draw(doc, plot)
        doc["plot"] = str(plot)
    return doc
