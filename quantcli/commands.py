"""The Typer app: one thin command per stage over quantcli.stages.

Every command parses options, calls one library function through `console.execute` (the error
boundary) and hands the result to the console to print. Heavy imports happen inside the
commands, so `quantcli --help` and `validate` stay instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantcli import __version__, render
from quantcli.console import Output, emit, execute, show

app = typer.Typer(
    name="quantcli",
    help="Turn a PyTorch model into a fast, accurate int8 ONNX model through the PT2E flow.\n\n"
    "Example: quantcli run --recipe configs/digits/recipe.yaml -o work",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Out = Annotated[Path, typer.Option("-o", "--out", help="output path")]
Json = Annotated[bool, typer.Option("--json", help="print exactly one JSON document on stdout")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="print nothing on stderr but errors")]
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")]
Force = Annotated[bool, typer.Option("--force", help="replace an existing quantcli output at -o")]
Resume = Annotated[bool, typer.Option("--resume", help="continue an interrupted training from its checkpoint")]
RecipeOpt = Annotated[Path | None, typer.Option("--recipe", help="recipe YAML")]


def version_callback(value: bool) -> None:
    if value:
        print(f"quantcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """quantcli: PyTorch model + YAML recipe -> int8 ONNX (QDQ), one stage per command."""


Src = Annotated[Path, typer.Argument(help="input artifact folder")]


@app.command()
def capture(
    recipe: Annotated[Path, typer.Option("--recipe", help="recipe YAML")],
    out: Out,
    force: Force = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Build the model from the recipe and capture it with torch.export.

    Example: quantcli capture --recipe configs/digits/recipe.yaml -o work/captured
    """
    o = Output(json, quiet, debug)
    from quantcli.stages import capture as stage

    emit(o, execute(o, lambda progress: stage.run(recipe, out, force=force)))


@app.command()
def prepare(
    src: Src,
    out: Out,
    qat: Annotated[bool, typer.Option("--qat", help="prepare for quantization-aware training")] = False,
    recipe: RecipeOpt = None,
    force: Force = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Annotate the captured graph with the recipe's quantizer and insert observers.

    Example: quantcli prepare work/captured -o work/prepared
    """
    o = Output(json, quiet, debug)
    from quantcli.stages import prepare as stage

    emit(o, execute(o, lambda progress: stage.run(src, out, qat=qat, recipe_path=recipe, force=force)))


@app.command()
def calibrate(
    src: Src,
    out: Out,
    data: Annotated[
        str | None, typer.Option("--data", help=".npz, folder of .npy, file.py:callable, text file or image folder")
    ] = None,
    batches: Annotated[int | None, typer.Option("--batches", min=1, help="use at most N batches")] = None,
    recipe: RecipeOpt = None,
    force: Force = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Run calibration batches through the prepared model to collect ranges.

    Example: quantcli calibrate work/prepared -o work/calibrated --batches 8
    """
    o = Output(json, quiet, debug)
    from quantcli.stages import calibrate as stage

    emit(
        o,
        execute(
            o,
            lambda progress: stage.run(
                src, out, data=data, batches=batches, recipe_path=recipe, force=force, progress=progress
            ),
            "calibrating",
        ),
    )


@app.command()
def train(
    src: Src,
    out: Out,
    recipe: RecipeOpt = None,
    resume: Resume = False,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    force: Force = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Quantization-aware training of a --qat prepared (or calibrated) artifact.

    Example: quantcli train work/calibrated -o work/trained
    """
    o = Output(json, quiet, debug)
    from quantcli.stages import train as stage

    emit(
        o,
        execute(
            o,
            lambda progress: stage.run(
                src, out, recipe_path=recipe, resume=resume, device=device, force=force, progress=progress
            ),
            "training",
        ),
    )


@app.command()
def convert(
    src: Src,
    out: Out,
    fold_quantize: Annotated[
        bool, typer.Option("--fold-quantize/--no-fold-quantize", help="store weights as int8 constants")
    ] = True,
    reference_representation: Annotated[
        bool, typer.Option("--reference-representation", help="apply the reference representation rewrite")
    ] = False,
    force: Force = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Convert observers to quantize/dequantize ops (convert_pt2e) and save the program.

    Example: quantcli convert work/calibrated -o work/converted
    """
    o = Output(json, quiet, debug)
    from quantcli.stages import convert as stage

    emit(
        o,
        execute(
            o,
            lambda progress: stage.run(
                src, out, fold_quantize=fold_quantize, reference_representation=reference_representation, force=force
            ),
        ),
    )


@app.command()
def export(
    src: Src,
    out: Out,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default: recipe)")] = None,
    recipe: RecipeOpt = None,
    force: Force = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Export to one ONNX QDQ file, check it, infer shapes, and test parity in ONNX Runtime.

    Example: quantcli export work/converted -o work/model.onnx
    """
    o = Output(json, quiet, debug)
    from quantcli.stages import export as stage

    emit(o, execute(o, lambda progress: stage.run(src, out, opset=opset, recipe_path=recipe, force=force)))


@app.command()
def run(
    recipe: Annotated[Path, typer.Option("--recipe", help="recipe YAML")],
    out: Out,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the resolved recipe and plan, run nothing")] = False,
    resume: Resume = False,
    force: Force = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Run every stage: capture, prepare, calibrate, (train), convert, export into one folder.

    Example: quantcli run --recipe configs/digits/recipe.yaml -o work
    """
    o = Output(json, quiet, debug)
    from quantcli import pipeline

    if dry_run:
        show(o, execute(o, lambda progress: pipeline.plan(recipe, out)), render.plan)
        return
    emit(
        o,
        execute(
            o, lambda progress: pipeline.run(recipe, out, force=force, resume=resume, progress=progress), "working"
        ),
    )


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Check a recipe (schema and referenced files) without importing torch.

    Example: quantcli validate configs/digits/recipe.yaml
    """
    o = Output(json, quiet, debug)
    from quantcli import pipeline

    doc = execute(o, lambda progress: pipeline.validate(recipe))
    show(o, doc, render.validated)
    if not json:
        o.console().print(f"checked {len(doc['files'])} referenced file(s)")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="a stage folder or an .onnx file")],
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Show an artifact's manifest and a summary of its graph.

    Example: quantcli inspect work/model.onnx --json
    """
    o = Output(json, quiet, debug)
    from quantcli import inspection

    show(o, execute(o, lambda progress: inspection.inspect(path)), render.inspected)


@app.command()
def report(
    src: Annotated[Path, typer.Argument(help="a converted artifact folder")],
    onnx: Annotated[Path | None, typer.Option("--onnx", help="its exported .onnx: ORT per layer too")] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="data instead of the recipe's evaluation (else calibration) data")
    ] = None,
    batches: Annotated[int | None, typer.Option("--batches", min=1, help="use at most N batches")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="write a PNG of per-layer SQNR")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace a file at --plot that quantcli did not write")
    ] = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Per-layer error of the int8 model against fp32 (local and accumulated SQNR), worst layers first.

    Example: quantcli report work/converted --onnx work/model.onnx --plot work/layers.png
    """
    o = Output(json, quiet, debug)
    from quantcli.report import layers

    show(
        o,
        execute(
            o,
            lambda progress: layers.run(
                src, onnx=onnx, data=data, batches=batches, plot=plot, force=force, progress=progress
            ),
            "measuring",
        ),
        render.layer_report,
    )


@app.command()
def tune(
    recipe: Annotated[Path, typer.Option("--recipe", help="recipe YAML")],
    out: Out,
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop", help="largest metric drop allowed, in the metric's units (0.01: one accuracy point)"
        ),
    ] = None,
    min_sqnr: Annotated[float | None, typer.Option("--min-sqnr", help="least output SQNR against fp32, dB")] = None,
    metric: Annotated[
        str | None, typer.Option("--metric", help="file.py:callable (outputs, targets) -> score, higher better")
    ] = None,
    max_trials: Annotated[int, typer.Option("--max-trials", min=0, help="trials after the baseline")] = 10,
    batches: Annotated[int | None, typer.Option("--batches", min=1, help="measure on at most N batches")] = None,
    force: Force = False,
    json: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Fix the most sensitive layers (another calibration method, then float) until the goal is met.

    Example: quantcli tune --recipe configs/digits/recipe.yaml -o work-tuned --max-drop 0.005
    """
    o = Output(json, quiet, debug)
    from quantcli.tune import search

    show(
        o,
        execute(
            o,
            lambda progress: search.run(
                recipe,
                out,
                max_drop=max_drop,
                min_sqnr=min_sqnr,
                metric=metric,
                max_trials=max_trials,
                batches=batches,
                force=force,
                progress=progress,
            ),
            "tuning",
        ),
        render.tuned,
    )
