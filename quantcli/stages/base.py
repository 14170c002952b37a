"""What every stage shares: the result type, the produce-into-staging loop, restoring modules."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from quantcli import artifacts
from quantcli.artifacts import Artifact
from quantcli.errors import InputError
from quantcli.recipe import Recipe, split_callable


@dataclass
class StageResult:
    """What a stage returns: where it wrote, its manifest, whether an existing output was reused."""

    stage: str
    out: Path
    manifest: dict[str, Any]
    reused: bool = False
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        if self.reused:
            return f"{self.stage}: reused {self.out} (same inputs and options)"
        return f"{self.stage}: wrote {self.out} in {self.seconds:.1f}s"

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "out": str(self.out), "reused": self.reused,
                "seconds": round(self.seconds, 3), "manifest": self.manifest, **self.details}


Progress = Callable[[int, int | None, dict[str, Any]], None]  # (done, total, metrics)


def no_progress(done: int, total: int | None, metrics: dict[str, Any]) -> None:
    """The default progress callback: library callers see nothing."""


def recipe_of(art: Artifact) -> Recipe:
    return Recipe.model_validate(art.manifest["recipe"])


def data_hashes(paths: dict[str, str]) -> dict[str, str]:
    """sha256 of each data file, folder or factory file a stage reads, keyed by recipe key path."""
    hashes = {}
    for key, value in paths.items():
        target = split_callable(value)
        if Path(value).exists():
            hashes[key] = artifacts.sha256_path(Path(value))
        elif target and target[0].endswith(".py") and Path(target[0]).is_file():
            hashes[key] = artifacts.sha256_file(Path(target[0]))
        elif target and not target[0].endswith(".py"):
            hashes[key] = value  # package.module:callable: named, not hashed
        else:
            raise InputError(f"{key}: file not found: {value}")
    return hashes


def produce(stage: str, out: Path, *, recipe: Recipe, parent: Artifact | None, options: dict[str, Any],
            data: dict[str, str], force: bool, body: Callable[[Path], dict[str, Any] | None]) -> StageResult:
    """Run `body(tmp_folder)` unless a complete output with the same key exists; commit atomically.

    `body` writes the payload files and returns extra manifest fields.
    """
    out = Path(out)
    recipe_json = recipe.model_dump(mode="json")
    parent_id = parent.digest if parent else recipe.digest()
    key = artifacts.stage_key(stage, options, parent_id, data)
    existing = artifacts.check_output(out, key, force, stage)
    if existing is not None:
        return StageResult(stage, out, existing, reused=True)
    start = time.perf_counter()
    with artifacts.staging(out) as st:
        extra = body(st.tmp) or {}
        manifest = artifacts.base_manifest(stage, recipe_json, recipe.digest(), parent, options, key, data)
        manifest.update(extra)
        seconds = time.perf_counter() - start
        manifest = st.write_manifest(manifest, {"seconds": seconds})
    return StageResult(stage, out, manifest, seconds=seconds)


def io_names(art: Artifact) -> dict[str, list[str]]:
    return art.manifest["io"]


def restore_prepared(art: Artifact) -> Any:
    """Rebuild the prepared (observed or fake-quantized) module of a prepared/calibrated/trained artifact.

    Prepared GraphModules do not pickle, so the artifact holds the captured program and the
    prepared module's state_dict; the same quantizer configuration (recorded, resolved, in the
    recipe) re-runs prepare and the state is loaded strictly, giving bit-identical outputs.
    """
    from quantcli import _torch, quantizers

    recipe = recipe_of(art)
    qat = bool(art.manifest["qat"])
    program = _torch.load_program(art.file(artifacts.PROGRAM))
    module = _torch.prepare(program.module(), quantizers.build(recipe.quantization, qat=qat), qat)
    if art.file(artifacts.STATE).exists():
        state = _torch.torch.load(art.file(artifacts.STATE), weights_only=True)
        module.load_state_dict(state, strict=True)
    if art.manifest.get("observers_frozen"):  # a trained artifact's ranges are final, in eval mode too
        _torch.disable_observers(module)
    return _torch.to_eval(module)


def save_state(module: Any, folder: Path) -> None:
    from quantcli import _torch

    _torch.torch.save(module.state_dict(), folder / artifacts.STATE)


def carry_program(parent: Artifact, folder: Path) -> None:
    artifacts.link_or_copy(parent.file(artifacts.PROGRAM), folder / artifacts.PROGRAM)
