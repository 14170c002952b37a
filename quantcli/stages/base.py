"""What every stage shares: the result type, the produce-into-staging loop, restoring modules."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from quantcli import __version__, artifacts, staging
from quantcli import recipe as recipes
from quantcli.artifacts import Artifact
from quantcli.errors import ArtifactError, InputError
from quantcli.recipe import Recipe
from quantcli.references import split_callable


@dataclass
class StageResult:
    """What a stage returns: where it wrote, its manifest, whether an existing output was reused."""

    stage: str
    out: Path
    manifest: dict[str, Any]
    reused: bool = False
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    work: str = ""  # how much work the output holds, for the closing line (calibration: batches, samples)
    redone: str | None = None  # why an existing output was replaced (artifacts.why_redone)
    writes_output = True  # False for a torchrun rank > 0, which trained a shard and wrote nothing

    def summary(self) -> str:
        if self.reused:
            return f"{self.stage}: reused {self.out} (same inputs and options){', ' + self.work if self.work else ''}"
        notes = "; ".join(n for n in (self.work, self.redone) if n)
        verb = "redone" if self.redone else "wrote"
        return f"{self.stage}: {verb} {self.out} in {self.seconds:.1f}s{f' ({notes})' if notes else ''}"

    def to_json(self) -> dict[str, Any]:
        redone = {"redone": self.redone} if self.redone else {}
        return {
            "stage": self.stage,
            "out": str(self.out),
            "reused": self.reused,
            "seconds": round(self.seconds, 3),
            "manifest": self.manifest,
            **redone,
            **self.details,
        }


Progress = Callable[[int, int | None, dict[str, Any]], None]  # (done, total, metrics)


def no_progress(done: int, total: int | None, metrics: dict[str, Any]) -> None:
    """The default progress callback: library callers see nothing."""


def recipe_of(art: Artifact) -> Recipe:
    """The recipe an artifact records; an artifact error when this quantcli's schema cannot read it."""
    try:
        return Recipe.model_validate(art.manifest["recipe"])
    except (KeyError, ValidationError) as exc:
        problem = (
            "no recipe"
            if isinstance(exc, KeyError)
            else "; ".join(line.split(";")[0] for line in recipes.format_errors(exc))
        )
        raise ArtifactError(
            f"{art.path} records a recipe this quantcli cannot read ({problem}); "
            f"it was made by quantcli {art.manifest.get('quantcli_version', 'unknown')}, this is {__version__}",
            f"recreate it with `{artifacts.producer(art.manifest['stage'])}`",
        ) from None


def _source(key: str, value: str) -> Path | None:
    """The file or folder behind a data reference; None for a package.module:callable."""
    target = split_callable(value)
    if Path(value).exists():
        return Path(value)
    if target and target[0].endswith(".py") and Path(target[0]).is_file():
        return Path(target[0])
    if target and not target[0].endswith(".py"):
        return None
    raise InputError(f"{key}: file not found: {value}")


def require_files(paths: dict[str, str]) -> None:
    """Fail with an input error naming the recipe key when a referenced file does not exist."""
    for key, value in paths.items():
        _source(key, value)


def data_hashes(paths: dict[str, str]) -> dict[str, str]:
    """sha256 of each data file, folder or factory file a stage reads, keyed by recipe key path.

    A package.module:callable is recorded by name, not hashed.
    """
    hashes = {}
    for key, value in paths.items():
        source = _source(key, value)
        hashes[key] = value if source is None else artifacts.sha256_path(source)
    return hashes


def callable_digest(recipe: Recipe, name: str, count: int | None) -> str:
    """What section `name`'s data callable yields, its first `count` batches (None: all) as a stage reads them
    (targets included where the metric needs them): the data key of a stage reading a callable."""
    import itertools

    from quantcli.loading.data import BatchDigest, iter_batches
    from quantcli.numerics.metrics import METRICS

    section = getattr(recipe, name)
    metric = METRICS.get(getattr(section, "metric", None) or "")
    targets = section.targets if metric is not None and metric.needs_targets else None
    _, batches = iter_batches(
        section.data, section.keys, recipe.inputs, section.batch_size, None, name, targets=targets
    )
    digest = BatchDigest()
    for batch in itertools.islice(batches, count):
        digest.add(batch)
    return digest.value()


def recipe_for(stage: str, parent: Artifact, recipe_path: str | Path | None) -> Recipe:
    """The recipe `stage` works with: the one recorded in `parent`, with --recipe's sections for this stage.

    A stage takes from --recipe exactly the sections it consumes (artifacts.STAGES); the sections
    consumed earlier in the parent's chain must not differ.
    """
    recorded = recipe_of(parent)
    if recipe_path is None:
        return recorded
    fixed = {section: artifacts.STAGES[s].command for s in parent.chain for section in artifacts.STAGES[s].consumes}
    return recipes.merge(
        recorded,
        recipes.load(recipe_path),
        takes=artifacts.STAGES[stage].consumes,
        fixed=fixed,
        command=artifacts.STAGES[stage].command,
    )


def keyed(
    stage: str, recipe: Recipe, parent: Artifact | None, options: dict[str, Any], data: dict[str, str]
) -> tuple[dict[str, Any], str]:
    """The options with the recipe sections `stage` consumes, and the output's reuse key."""
    options = {**options, "recipe": recipe.sections(*artifacts.STAGES[stage].consumes)}
    return options, artifacts.stage_key(stage, options, parent.digest if parent else None, data)


def produce(
    stage: str,
    out: Path,
    *,
    recipe: Recipe,
    parent: Artifact | None,
    options: dict[str, Any],
    data: dict[str, str],
    force: bool,
    body: Callable[[staging.Staging], dict[str, Any] | None],
) -> StageResult:
    """Run `body(staging)` unless a complete output with the same key exists; commit atomically.

    `body` writes the payload into `staging.tmp` and returns extra manifest fields. The key is made
    of the stage, its options, the recipe sections it consumes, the data it reads, the parent
    artifact's hash and the versions (artifacts.stage_key). `body` may return `data` again, with
    what it saw while it worked (the batches a data callable yielded): the output is keyed by that.
    The exported stage writes one .onnx file (and its report), the others a folder.
    """
    out = Path(out)
    onnx_file = stage == "exported"
    staging.check_name(out, onnx_file)
    keyed_options, key = keyed(stage, recipe, parent, options, data)
    parent_digest = parent.digest if parent else None

    def why(previous: dict[str, Any]) -> str:
        return artifacts.why_redone(previous, keyed_options, parent_digest, data)

    previous = staging.previous_manifest(out, onnx_file)
    check = staging.check_onnx if onnx_file else functools.partial(staging.check_output, stage=stage)
    existing = check(out, key, force, why=why)
    if existing is not None:
        return StageResult(stage, out, existing, reused=True)
    redone = None if previous is None else _why_again(previous, key, force, why)
    start = time.perf_counter()
    with staging.staging(out, onnx_file) as st:
        extra = body(st) or {}
        if "data" in extra:
            data = extra.pop("data")
            keyed_options, key = keyed(stage, recipe, parent, options, data)
        manifest = artifacts.base_manifest(
            stage, recipe.model_dump(mode="json"), recipe.digest(), parent, keyed_options, key, data
        )
        manifest.update(extra)
        seconds = time.perf_counter() - start
        manifest = st.seal(manifest, {"seconds": seconds})
    details = {"report": st.report} if onnx_file else {}
    return StageResult(stage, out, manifest, seconds=seconds, details=details, redone=redone)


def _why_again(previous: dict[str, Any], key: str, force: bool, why: Callable[[dict[str, Any]], str]) -> str:
    """Why an existing output is made again: what changed, else --force, else it did not match its report."""
    if previous.get("key") != key:
        return why(previous)
    return "--force" if force else "it did not match its report"


def restore_prepared(
    art: Artifact, program: str = artifacts.PROGRAM, float_biases: bool = False, captured: Any = None
) -> Any:
    """Rebuild the prepared (observed or fake-quantized) module of a prepared/calibrated/trained artifact.

    A converted artifact keeps the captured program as `float.pt2` and the state it was converted
    from: `restore_prepared(converted, artifacts.FLOAT_PROGRAM)` gives the calibrated module back.
    `float_biases`: the biases calibrate corrected (quantizers.bias_correction) as the float model has them,
    for a float reference. `captured`: the program at `program`, where the caller has loaded it already (its
    tensors become the module's).

    Prepared GraphModules do not pickle, so the artifact holds the captured program and the
    prepared module's state_dict; the same quantizer configuration (recorded, resolved, in the
    recipe) re-runs prepare and the state is loaded strictly, giving bit-identical outputs.
    """
    from quantcli import _torch, quantizers, weightonly

    recipe = recipe_of(art)
    qat = bool(art.manifest["qat"])
    captured = captured if captured is not None else _torch.load_program(art.file(program))
    if recipe.quantization.weight_only:  # statistics collectors where a method needs them, no observers
        module = weightonly.prepare(captured.module(), recipe.quantization)
    else:
        module = _torch.prepare(captured.module(), quantizers.build(recipe.quantization, qat=qat), qat)
    if art.file(artifacts.STATE).exists():
        state = _torch.load_state(art.file(artifacts.STATE))
        if float_biases:  # the values prepare computes from the captured program (folded BatchNorms included)
            prepared = module.state_dict()
            state.update({name: prepared[name] for name in art.manifest.get("bias_correction", {}).get("biases", [])})
        module.load_state_dict(state, strict=True)
    if art.manifest.get("observers_frozen"):  # a trained artifact's ranges are final, in eval mode too
        _torch.disable_observers(module)
    return _torch.to_eval(module)


def save_state(module: Any, folder: Path) -> None:
    from quantcli import _torch

    _torch.save_state(module.state_dict(), folder / artifacts.STATE)


def carry_program(parent: Artifact, folder: Path) -> None:
    staging.link_or_copy(parent.file(artifacts.PROGRAM), folder / artifacts.PROGRAM)
